"""Results on disk. The unit JSONs are the truth; plan.json says what the last run planned;
manifest.json is rebuilt from both, so it can never disagree with them.

    OUT/units/<layer>/<index>.webp        (K > 1: <index>.0.webp ... <index>.<K-1>.webp)
    OUT/units/<layer>/<index>.timelapse.webp   the optimization as an animation (--timelapse)
    OUT/units/<layer>/<index>.json        written last: a unit with a JSON is complete
    OUT/plan.json                         the last run's model, recipe, layers, unit keys, times
    OUT/exemplars/<layer>/<index>.json    a unit's dataset exemplars (--exemplars DIR), written
    OUT/exemplars/<layer>/<index>.<key>.<j>.webp  after its patches; summary.json for the folder
    OUT/manifest.json                     everything the site needs

Statuses, one per unit: done (stored with the planned key), failed (stored as failed with the
planned key), missing (planned, nothing stored), stale (stored, but not planned any more or
planned with another key: the old result is shown until the new one replaces it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from atlas.files import (
    atomic_write_bytes,
    atomic_write_json,
    exclusive_lock,
    remove_temporaries,
    safe_name,
)

HISTORY_POINTS = 128
STATUSES = ("done", "failed", "missing", "stale")


def layer_dirname(layer: str) -> str:
    """A folder name for a layer: the name itself when safe, else a sanitized name plus a
    short hash, so that two layers never share a folder."""
    safe = safe_name(layer)
    return safe if safe == layer else f"{safe}-{hashlib.sha256(layer.encode()).hexdigest()[:8]}"


def downsample(history: list[float], points: int = HISTORY_POINTS) -> list[list[float]]:
    """[[step, value], ...] at most `points` long, always keeping the first and last step."""
    if not history:
        return []
    steps = np.unique(np.linspace(0, len(history) - 1, min(points, len(history))).round())
    return [[int(step), round(float(history[int(step)]), 5)] for step in steps]


def _is_unit_record(value: object) -> bool:
    """Unit JSONs are dicts with a layer and an index; anything else in units/ is foreign."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("layer"), str)
        and isinstance(value.get("index"), int)
    )


class Store:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.units_dir = self.out / "units"

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

    def unit_path(self, layer: str, index: int, suffix: str) -> Path:
        return self.units_dir / layer_dirname(layer) / f"{index}{suffix}"

    def records(self) -> list[dict]:
        """Every stored unit record; unreadable JSONs (never written by atlas) are skipped."""
        records = []
        for path in sorted(self.units_dir.glob("*/*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if _is_unit_record(record):
                records.append(record)
        return records

    def index(self) -> dict[tuple[str, int], dict]:
        return {(r["layer"], r["index"]): r for r in self.records()}

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
            or record.get("key") != unit.key
            or record.get("status") != "done"
        ]

    def save_unit(
        self, record: dict, images: list[bytes], files: dict[str, bytes] | None = None
    ) -> None:
        """Images and named WebP files (`{"timelapse": ...}` -> <index>.timelapse.webp, its
        path under the record's key of that name) first, the JSON last (atomic each), then
        files of older runs are removed."""
        layer, index = record["layer"], record["index"]
        suffixes = [".webp"] if len(images) == 1 else [f".{k}.webp" for k in range(len(images))]
        record = dict(record)

        def write(suffix: str, data: bytes) -> str:
            path = self.unit_path(layer, index, suffix)
            atomic_write_bytes(path, data)
            return path.relative_to(self.out).as_posix()

        names = [write(suffix, data) for suffix, data in zip(suffixes, images, strict=True)]
        for name, data in (files or {}).items():
            record[name] = write(f".{name}.webp", data)
        atomic_write_json(self.unit_path(layer, index, ".json"), {**record, "images": names})
        keep = {Path(name).name for name in names} | {
            Path(record[name]).name for name in files or {}
        }
        for old in self._images_of(layer, index):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def _images_of(self, layer: str, index: int) -> list[Path]:
        """<index>.webp and <index>.<k>.webp (the pattern cannot match 31.webp for 3)."""
        return list(self.unit_path(layer, index, "").parent.glob(f"{index}.*webp"))

    def remove_unit(self, layer: str, index: int) -> None:
        self.unit_path(layer, index, ".json").unlink(missing_ok=True)
        for image in self._images_of(layer, index):
            image.unlink(missing_ok=True)

    # --- dataset exemplars (written by atlas.exemplars, shown by the site) ---

    def exemplar_path(self, layer: str, index: int, suffix: str) -> Path:
        return self.out / "exemplars" / layer_dirname(layer) / f"{index}{suffix}"

    def exemplars(self) -> dict[tuple[str, int], dict]:
        """Every stored exemplar record by (layer, index); unreadable ones are skipped."""
        found = {}
        for path in sorted((self.out / "exemplars").glob("*/*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if _is_unit_record(record) and isinstance(record.get("items"), list):
                found[(record["layer"], record["index"])] = record
        return found

    def save_exemplars(self, record: dict) -> None:
        """The record (its patches are written already), then patches of older passes that
        this one no longer lists are removed."""
        layer, index = record["layer"], record["index"]
        atomic_write_json(self.exemplar_path(layer, index, ".json"), record)
        keep = {Path(item["image"]).name for item in record["items"]}
        for old in self.exemplar_path(layer, index, "").parent.glob(f"{index}.*.webp"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def exemplar_summary(self) -> dict | None:
        try:
            return json.loads((self.out / "exemplars" / "summary.json").read_text())
        except (OSError, ValueError):
            return None

    def write_exemplar_summary(self, summary: dict) -> None:
        atomic_write_json(self.out / "exemplars" / "summary.json", summary)

    def read_exemplar_progress(self, pass_key: str) -> dict | None:
        """What an interrupted exemplar pass with this key had merged, if any."""
        try:
            saved = json.loads((self.out / "exemplars" / "progress.json").read_text())
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) and saved.get("pass") == pass_key else None

    def write_exemplar_progress(self, progress: dict) -> None:
        atomic_write_json(self.out / "exemplars" / "progress.json", progress)

    def clear_exemplar_progress(self) -> None:
        (self.out / "exemplars" / "progress.json").unlink(missing_ok=True)

    def read_plan(self) -> dict | None:
        path = self.out / "plan.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def write_plan(self, plan_record: dict) -> None:
        atomic_write_json(self.out / "plan.json", plan_record)

    def classify(self) -> tuple[list[dict], dict | None]:
        """Every unit the site should show, with its status: stored records (done, failed,
        stale) and planned units without a current result (missing)."""
        plan = self.read_plan()
        planned = {(u["layer"], u["index"]): u for u in (plan or {}).get("units", [])}
        stored = self.index()
        digest = ((plan or {}).get("model") or {}).get("digest")
        exemplars = {k: e for k, e in self.exemplars().items() if e.get("digest") == digest}
        units = []
        for key, record in stored.items():
            wanted = planned.get(key)
            current = wanted is not None and wanted["key"] == record.get("key")
            status = record.get("status", "done") if current else "stale"
            units.append({**record, "status": status})
        for key, unit in planned.items():
            if key not in stored:  # a planned unit with an outdated result shows as stale
                units.append({**unit, "status": "missing", "images": []})
        for unit in units:  # exemplars of the current weights, whatever the unit's status
            if (found := exemplars.get((unit["layer"], unit["index"]))) is not None:
                unit["exemplars"] = found["items"]
        order = {layer["name"]: i for i, layer in enumerate((plan or {}).get("layers", []))}
        units.sort(key=lambda u: (order.get(u["layer"], len(order)), u["layer"], u["index"]))
        return units, plan

    def status(self) -> dict[str, Counter]:
        """Per layer, how many units are done, failed, missing and stale."""
        units, _ = self.classify()
        table: dict[str, Counter] = {}
        for unit in units:
            table.setdefault(unit["layer"], Counter())[unit["status"]] += 1
        return table

    def prune(self) -> int:
        """Remove units that the last plan does not contain; returns how many."""
        plan = self.read_plan() or {"units": []}
        planned = {(u["layer"], u["index"]) for u in plan["units"]}
        removed = 0
        for key in self.index():
            if key not in planned:
                self.remove_unit(*key)
                removed += 1
        return removed

    def write_manifest(self) -> dict:
        """Rebuild manifest.json from plan.json and the unit JSONs."""
        units, plan = self.classify()
        plan = plan or {}
        counts = Counter(unit["status"] for unit in units)
        manifest = {
            **{k: v for k, v in plan.items() if k != "units"},
            "counts": {status: counts.get(status, 0) for status in STATUSES},
            "exemplars": self.exemplar_summary(),
            "units": units,
        }
        atomic_write_json(self.out / "manifest.json", manifest)
        return manifest
