"""Results on disk. The unit JSONs are the truth; plan.json says what the last run planned;
manifest.json is rebuilt from both, so it can never disagree with them.

    OUT/units/<layer>/<index>.webp        (K > 1: <index>.0.webp ... <index>.<K-1>.webp)
    OUT/units/<layer>/<index>.timelapse.webp   the optimization as an animation (--timelapse)
    OUT/units/<layer>/<index>.json        written last: a unit with a JSON is complete
    OUT/plan.json                         the last run's model, recipe, layers, unit keys, times
    OUT/exemplars/<layer>/<index>.json    a unit's dataset exemplars (--exemplars DIR), written
    OUT/exemplars/<layer>/<index>.<key>.<j>.webp  after its patches; summary.json for the folder
    OUT/concepts/<layer>/                 a layer's samples, dictionary and activation atlas
                                          (atlas.learning); its concepts' and cells' units and
                                          exemplars are those of <layer>~concepts, <layer>~atlas
    OUT/manifest.json                     everything the site needs
    OUT/checkpoints/, OUT/blobs/          earlier checkpoints' results (atlas.history)

Statuses, one per unit: done (stored with the planned key), failed (stored as failed with the
planned key), missing (planned, nothing stored), stale (stored, but not planned any more or
planned with another key: the old result is shown until the new one replaces it).

A damaged stored file (truncated, garbled, not what atlas wrote) is never an error: it is named
in one `warning:` line and treated as absent, so that the run goes on and the next `atlas run`
redoes what it held. Only a corrupt plan.json stops `atlas status` (it alone says what is
planned); `atlas run` rewrites it before reading it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from atlas.errors import AtlasError
from atlas.files import (
    atomic_write_bytes,
    atomic_write_json,
    exclusive_lock,
    remove_temporaries,
    safe_name,
)
from atlas.history import History
from atlas.history_timeline import timeline
from atlas.record import STATUSES, VARIANT_FILE, UnitRecord, split_layer

UNIT_FILES = ("timelapse", "maps")  # record fields that name a unit's extra WebP files


def layer_dirname(layer: str) -> str:
    """A folder name for a layer: the name itself when safe, else a sanitized name plus a
    short hash, so that two layers never share a folder. A learned layer's is its real
    layer's with its "~part" (no safe name holds a "~")."""
    real, part = split_layer(layer)
    if part is not None:
        return f"{layer_dirname(real)}~{part}"
    safe = safe_name(layer)
    return safe if safe == layer else f"{safe}-{hashlib.sha256(layer.encode()).hexdigest()[:8]}"


def _is_unit_record(value: object) -> bool:
    """Exemplar JSONs, like unit JSONs, are dicts with a layer and an index."""
    return UnitRecord.from_json(value) is not None


def warn(message: str) -> None:
    """One `warning:` line on stderr: a damaged file is news for the user, not bad input (the
    command goes on, and the next run repairs the file)."""
    print(f"warning: {message}", file=sys.stderr)


def webp_problem(path: Path) -> str | None:
    """Why a stored WebP cannot be shown ("missing", "corrupt (truncated)", ...), or None.

    Only the 12-byte RIFF header and the file size are read: about 20 us a file, 0.4 s for
    20,000 units, where opening each with Pillow costs ~50 us and decoding ~1 ms. atlas writes
    atomically, so damage comes from outside (a cut copy, an editor, a disk) and nearly always
    breaks the header or the length that the header promises."""
    try:
        with open(path, "rb") as file:
            head = file.read(12)
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as error:
        return f"is unreadable ({error.strerror})"
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return "is corrupt (not a WebP image)"
    promised = int.from_bytes(head[4:8], "little") + 8
    if promised != size:
        return f"is corrupt ({'truncated' if size < promised else 'wrong length'})"
    return None


def webp_size(path: Path) -> tuple[int, int] | None:
    """A WebP's width and height from its first 30 bytes (lossy, lossless or extended
    header), None when they do not say: ~20x cheaper than opening it with Pillow, for the
    thousands of filmstrip frames of a nightly atlas."""
    try:
        with open(path, "rb") as file:
            head = file.read(30)
    except OSError:
        return None
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    kind = head[12:16]
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = (int.from_bytes(head[i : i + 2], "little") & 0x3FFF for i in (26, 28))
        return width, height
    if kind == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X":
        width, height = (int.from_bytes(head[i : i + 3], "little") + 1 for i in (24, 27))
        return width, height
    return None


class Store:
    def __init__(self, out: str | Path, warn: Callable[[str], None] = warn):
        self.out = Path(out)
        self.units_dir = self.out / "units"
        self._warn = warn
        self._warned: set[str] = set()
        self.history = History(self)  # the checkpoints kept in OUT

    def report(self, path: Path, problem: str, consequence: str) -> None:
        """Warn once per file and Store: records() runs several times in one `atlas run`."""
        name = path.relative_to(self.out).as_posix() if path.is_relative_to(self.out) else path
        if str(name) not in self._warned:
            self._warned.add(str(name))
            self._warn(f"{name} {problem}; {consequence}")

    def _read_json(self, path: Path, consequence: str) -> object | None:
        """A stored JSON, or None (with a warning naming the file when it is damaged)."""
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except OSError as error:
            self.report(path, f"is unreadable ({error.strerror})", consequence)
        except ValueError:
            self.report(path, "is corrupt (not valid JSON)", consequence)
        return None

    def _images_usable(self, record: UnitRecord) -> bool:
        """Whether every image a unit record lists (samples and animation) is intact; one
        damaged file makes the whole unit count as not stored, so the next run redoes it."""
        for name in record.files:
            if problem := webp_problem(self.out / name):
                self.report(self.out / name, problem, f"the next atlas run redoes {record.id}")
                return False
        return True

    @contextlib.contextmanager
    def claimed(self) -> Iterator[None]:
        """Make this process the only writer of OUT's records for the block (a second `atlas
        run` on the same folder stops with a clear error), then sweep the temporaries a killed
        run left: with the lock held, no write of them can be in flight. site/ has its own
        lock (see atlas.site.render)."""
        self.out.mkdir(parents=True, exist_ok=True)
        busy = f"another atlas run is writing {self.out}"
        with exclusive_lock(self.out / ".atlas.lock", busy) as alone:
            if alone:
                remove_temporaries(self.out)
                for folder in ("units", "exemplars"):
                    if (self.out / folder).is_dir():
                        remove_temporaries(self.out / folder, below=True)
            yield

    def unit_path(self, layer: str, index: int | None, suffix: str) -> Path:
        """units/<layer>/<index><suffix>; a layer's whole-layer image is units/<layer>/layer."""
        return (
            self.units_dir / layer_dirname(layer) / f"{'layer' if index is None else index}{suffix}"
        )

    def records(self, verify: bool = True) -> list[UnitRecord]:
        """Every stored unit record. Damaged JSONs (not JSON, not a unit record, a field of
        the wrong type), and (with `verify`) records whose images are damaged, are named in a
        warning and left out: to the rest of atlas the unit is not stored, so it shows as
        missing and the next run redoes it (only atlas writes to units/)."""
        records = []
        for path in sorted(self.units_dir.glob("*/*.json")):
            redo = "the next atlas run redoes this unit"
            data = self._read_json(path, redo)
            try:
                record = UnitRecord.from_json(data)
            except ValueError as error:
                self.report(path, f"is corrupt ({error})", redo)
                continue
            if record is None:
                if data is not None or path.exists():
                    self.report(path, "is corrupt (not a unit record)", redo)
                continue
            if not verify or self._images_usable(record):
                records.append(record)
        return records

    def index(self) -> dict[tuple[str, int], UnitRecord]:
        return {(r.layer, r.index): r for r in self.records()}

    def pending(self, units, force: bool = False) -> list:
        """The planned units that have no stored result with their key (all, with force).
        Failed units are retried."""
        if force:
            return list(units)
        stored = self.index()
        return [
            unit
            for unit in units
            if (record := stored.get((unit.layer, unit.index))) is None
            or record.key != unit.key
            or record.status != "done"
        ]

    def save_unit(
        self, record: UnitRecord, images: list[bytes], files: dict[str, bytes] | None = None
    ) -> None:
        """The images and the record's other files first (`files` maps a field naming a file,
        "timelapse" or "maps", or "variant:<name>", to its WebP bytes: <index>.<name>.webp),
        the JSON last (atomic each), then files of older runs are removed. The record's file
        names are set here."""
        layer, index = record.layer, record.index
        suffixes = [".webp"] if len(images) == 1 else [f".{k}.webp" for k in range(len(images))]

        def write(suffix: str, data: bytes) -> str:
            path = self.unit_path(layer, index, suffix)
            atomic_write_bytes(path, data)
            return path.relative_to(self.out).as_posix()

        names = tuple(write(suffix, data) for suffix, data in zip(suffixes, images, strict=True))
        named: dict = dict.fromkeys(UNIT_FILES)  # a field without a file this time names none
        named["variants"] = {}
        for name, data in (files or {}).items():
            if name.startswith(VARIANT_FILE):
                variant = name.removeprefix(VARIANT_FILE)
                named["variants"][variant] = write(f".{variant}.webp", data)
            else:
                named[name] = write(f".{name}.webp", data)
        record = dataclasses.replace(
            record, images=names, **named, exemplars=(), trust=None, filmstrip=()
        )
        atomic_write_json(self.unit_path(layer, index, ".json"), record.as_json())
        keep = {Path(name).name for name in record.files}
        for old in self._images_of(layer, index):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def _images_of(self, layer: str, index: int | None) -> list[Path]:
        """<index>.webp and <index>.<k>.webp (the pattern cannot match 31.webp for 3)."""
        stem = self.unit_path(layer, index, "")
        return list(stem.parent.glob(f"{stem.name}.*webp"))

    def remove_unit(self, layer: str, index: int) -> None:
        self.unit_path(layer, index, ".json").unlink(missing_ok=True)
        for image in self._images_of(layer, index):
            image.unlink(missing_ok=True)

    # --- dataset exemplars (written by atlas.exemplars, shown by the site) ---

    def exemplar_path(self, layer: str, index: int, suffix: str) -> Path:
        return self.out / "exemplars" / layer_dirname(layer) / f"{index}{suffix}"

    def exemplars(self, verify: bool = True) -> dict[tuple[str, int], dict]:
        """Every stored exemplar record by (layer, index). Damaged JSONs, and (with `verify`)
        records with a damaged patch, are named and left out, so that the next exemplar pass
        redoes them. The manifest does not verify (a unit has many patches; the site checks
        the ones it links)."""
        found = {}
        redo = "the next atlas run with --exemplars redoes it"
        for path in sorted((self.out / "exemplars").glob("*/*.json")):
            record = self._read_json(path, redo)
            if not (_is_unit_record(record) and isinstance(record.get("items"), list)):
                continue
            if verify and not self._patches_usable(record, redo):
                continue
            found[(record["layer"], record["index"])] = record
        return found

    def _patches_usable(self, record: dict, consequence: str) -> bool:
        for item in record["items"]:
            name = item.get("image") if isinstance(item, dict) else None
            problem = webp_problem(self.out / name) if isinstance(name, str) else "is missing"
            if problem:
                self.report(self.out / str(name), problem, consequence)
                return False
        return True

    def save_exemplars(self, record: dict) -> None:
        """The record (its patches, and the maps of where a concept fires, are written
        already), then files of older passes that this one no longer lists are removed."""
        layer, index = record["layer"], record["index"]
        atomic_write_json(self.exemplar_path(layer, index, ".json"), record)
        named = [item.get(name) for item in record["items"] for name in ("image", "map")]
        keep = {Path(name).name for name in named if name}
        for old in self.exemplar_path(layer, index, "").parent.glob(f"{index}.*.webp"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def exemplar_summary(self) -> dict | None:
        path = self.out / "exemplars" / "summary.json"
        summary = self._read_json(path, "the next atlas run with --exemplars rewrites it")
        return summary if isinstance(summary, dict) else None

    def write_exemplar_summary(self, summary: dict) -> None:
        atomic_write_json(self.out / "exemplars" / "summary.json", summary)

    def read_exemplar_progress(self, pass_key: str) -> dict | None:
        """What an interrupted exemplar pass with this key had merged, if any."""
        path = self.out / "exemplars" / "progress.json"
        saved = self._read_json(path, "the exemplar pass starts over")
        return saved if isinstance(saved, dict) and saved.get("pass") == pass_key else None

    def write_exemplar_progress(self, progress: dict) -> None:
        atomic_write_json(self.out / "exemplars" / "progress.json", progress)

    def clear_exemplar_progress(self) -> None:
        (self.out / "exemplars" / "progress.json").unlink(missing_ok=True)

    def read_plan(self) -> dict | None:
        """The last run's plan, None before the first. A damaged plan is an error naming the
        file, not a warning: without it no unit can be called missing or stale, so every
        count would be wrong. `atlas run` writes a new plan before it reads one."""
        path = self.out / "plan.json"
        if not path.is_file():
            return None
        try:
            plan = json.loads(path.read_text())
        except (OSError, ValueError):
            plan = None
        if not isinstance(plan, dict) or not isinstance(plan.get("units", []), list):
            raise AtlasError(f"{path} is corrupt; the next `atlas run` on {self.out} rewrites it")
        return plan

    def write_plan(self, plan_record: dict) -> None:
        atomic_write_json(self.out / "plan.json", plan_record)

    def classify(self) -> tuple[list[UnitRecord], dict | None]:
        """Every unit the site should show, with its status: stored records (done, failed,
        stale) and planned units without a current result (missing)."""
        plan = self.read_plan()
        planned = {(u["layer"], u["index"]): u for u in (plan or {}).get("units", [])}
        stored = self.index()
        digest = ((plan or {}).get("model") or {}).get("digest")
        found = self.exemplars(verify=False).items()
        exemplars = {k: e for k, e in found if e.get("digest") == digest}
        units = []
        for key, record in stored.items():
            wanted = planned.get(key)
            current = wanted is not None and wanted["key"] == record.key
            units.append(record.with_status(record.status if current else "stale"))
        for key, unit in planned.items():
            if key not in stored:  # a planned unit with an outdated result shows as stale
                units.append(UnitRecord.from_json(unit).with_status("missing"))
        # exemplars of the current weights, whatever the unit's status
        units = [u.with_status(u.status, exemplars.get((u.layer, u.index))) for u in units]
        order = {layer["name"]: i for i, layer in enumerate((plan or {}).get("layers", []))}

        def place(unit: UnitRecord) -> tuple:  # a layer's whole-layer image before its units
            index = -1 if unit.index is None else unit.index
            return (order.get(unit.layer, len(order)), unit.layer, index)

        units.sort(key=place)
        return units, plan

    def status(self) -> dict[str, Counter]:
        """Per layer, how many units are done, failed, missing and stale."""
        units, _ = self.classify()
        table: dict[str, Counter] = {}
        for unit in units:
            table.setdefault(unit.layer, Counter())[unit.status] += 1
        return table

    def prune(self) -> int:
        """Remove units that the last plan does not contain; returns how many."""
        plan = self.read_plan() or {"units": []}
        planned = {(u["layer"], u["index"]) for u in plan["units"]}
        removed = 0
        stored = {(r.layer, r.index) for r in self.records(verify=False)}
        for key in stored:
            if key not in planned:
                self.remove_unit(*key)
                removed += 1
        return removed

    def write_manifest(self) -> dict:
        """Rebuild manifest.json from plan.json, the unit JSONs and the archived checkpoints."""
        units, plan = self.classify()
        checkpoints, units = timeline(self.history, plan, units)
        plan = plan or {}
        counts = Counter(unit.status for unit in units)
        manifest = {
            **{k: v for k, v in plan.items() if k not in ("units", "checkpoint")},
            "counts": {status: counts.get(status, 0) for status in STATUSES},
            "checkpoints": checkpoints,
            "exemplars": self.exemplar_summary(),
            "units": [unit.as_json() for unit in units],
        }
        atomic_write_json(self.out / "manifest.json", manifest, indent=None)
        return manifest
