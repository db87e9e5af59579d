"""Checkpoints: one OUT keeps every checkpoint's results, so a nightly atlas shows how each
unit forms while the model trains.

    OUT/checkpoints/<id>/units.json       an archived checkpoint: its facts and slim unit records
    OUT/checkpoints/<id>/checkpoint.json  its facts alone (the timeline reads only these)
    OUT/blobs/<hh>/<sha256>.webp          archived images by content: identical ones stored once

A checkpoint is one set of weights (its digest) with the date it was first run and an optional
`--label`. units/ holds the newest checkpoint's full records, as it always has; plan.json names
that checkpoint. A run with other weights first archives the checkpoint units/ holds (blobs are
hard links of its images, so archiving copies nothing where links work), then overwrites
units/: a run killed at any point leaves every archived checkpoint whole, and its rerun
finishes the new one. Each run archives its checkpoint again at the end, marked complete when
every planned unit has a result, and then keeps the newest `--keep` checkpoints.

This module reads and writes files only; it never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from atlas.errors import AtlasError
from atlas.files import atomic_write_json
from atlas.record import UnitRecord

DEFAULT_KEEP = 30
CHECKPOINTS = "checkpoints"
BLOBS = "blobs"
# what an archived unit keeps: enough for a filmstrip frame and for `atlas compare OUT@label`
ARCHIVED = ("id", "layer", "index", "kind", "label", "key", "status", "images", "activation")
ARCHIVED += ("change", "change_from")

Key = tuple[str, "int | None"]


@dataclass(frozen=True)
class Checkpoint:
    """One set of weights an OUT was run with."""

    id: str  # "<seq>-<digest prefix>": unique, sorts oldest first
    seq: int
    digest: str
    spec: str
    weights: str | None
    label: str | None
    started: str
    finished: str | None = None
    complete: bool = False
    units: int = 0  # done units

    @classmethod
    def first(cls, seq: int, model, label: str | None, started: str) -> Checkpoint:
        return cls(
            f"{seq:03d}-{model.digest[:8]}", seq, model.digest, model.spec, model.weights, label,
            started,
        )  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> Checkpoint | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError:
            return None

    @property
    def name(self) -> str:
        """How people call it: its label, else its id."""
        return self.label or self.id


def legacy_checkpoint(plan: dict) -> Checkpoint | None:
    """The checkpoint of an OUT written before checkpoints were recorded: its plan's."""
    model = plan.get("model") or {}
    if not isinstance(model.get("digest"), str):
        return None
    digest = model["digest"]
    started = str(plan.get("started") or "")
    return Checkpoint(
        f"001-{digest[:8]}", 1, digest, str(model.get("spec")), model.get("weights"), None, started
    )


def named_checkpoint(plan: dict | None) -> Checkpoint | None:
    """The checkpoint a plan.json names (that of an older OUT's plan when it names none)."""
    if not plan:
        return None
    return Checkpoint.from_json(plan.get("checkpoint")) or legacy_checkpoint(plan)


class History:
    """The archived checkpoints of a Store's OUT (damaged files are named as the Store does)."""

    def __init__(self, store):
        self.store = store
        self.out = store.out
        self.root = self.out / CHECKPOINTS
        self._frames: dict[str, tuple[tuple, dict[Key, dict]]] = {}  # id -> (stat, frames)

    # --- reading ---

    def archived(self) -> list[Checkpoint]:
        """Every archived checkpoint, oldest first. A damaged checkpoint.json is rebuilt from
        its units.json; a checkpoint whose units.json is damaged is left out, named."""
        found = []
        for folder in sorted(self.root.glob("*/")) if self.root.is_dir() else []:
            facts = Checkpoint.from_json(_read(folder / "checkpoint.json"))
            if facts is None:
                archive = _read(folder / "units.json")
                facts = Checkpoint.from_json((archive or {}).get("checkpoint"))
                if facts is None:
                    if (folder / "units.json").exists():
                        self.store.report(
                            folder / "units.json",
                            "is corrupt",
                            "that checkpoint is left out of the history",
                        )
                    continue
                atomic_write_json(folder / "checkpoint.json", asdict(facts))
            found.append(facts)
        return sorted(found, key=lambda c: c.seq)

    def units(self, checkpoint: Checkpoint) -> dict[Key, UnitRecord]:
        """An archived checkpoint's units by (layer, index); those whose image is gone are
        left out (the filmstrip shows a gap)."""
        archive = _read(self.root / checkpoint.id / "units.json")
        records = {}
        for data in (archive or {}).get("units", []):
            try:
                record = UnitRecord.from_json(data)
            except ValueError:
                record = None
            if record is not None and record.images and (self.out / record.images[0]).is_file():
                records[(record.layer, record.index)] = record
        return records

    def frames(self, checkpoint: Checkpoint) -> dict[Key, dict]:
        """An archived checkpoint's filmstrip frames by (layer, index), read without parsing
        whole records and kept while its units.json is unchanged (a run rebuilds the manifest
        every minute; the archives do not change meanwhile)."""
        path = self.root / checkpoint.id / "units.json"
        try:
            stat = path.stat()
        except OSError:
            return {}
        seen = (stat.st_mtime_ns, stat.st_size)
        if checkpoint.id in self._frames and self._frames[checkpoint.id][0] == seen:
            return self._frames[checkpoint.id][1]
        frames = {}
        for unit in (_read(path) or {}).get("units", []):
            images, change = unit.get("images"), unit.get("change")
            if not (isinstance(unit.get("layer"), str) and isinstance(images, list) and images):
                continue
            if isinstance(images[0], str) and (self.out / images[0]).is_file():
                change = change if isinstance(change, int | float) else None
                frame = {"checkpoint": checkpoint.id, "image": images[0], "change": change}
                frames[(unit["layer"], unit.get("index"))] = frame
        self._frames[checkpoint.id] = (seen, frames)
        return frames

    def plan(self, checkpoint: Checkpoint) -> dict:
        """An archived checkpoint's plan.json, less its units and labels."""
        return dict((_read(self.root / checkpoint.id / "units.json") or {}).get("plan") or {})

    def find(self, name: str) -> Checkpoint:
        """A checkpoint by label (the newest with it), id, or id prefix."""
        timeline = self.archived()
        for checkpoint in reversed(timeline):
            if name in (checkpoint.label, checkpoint.id):
                return checkpoint
        starting = [c for c in timeline if c.id.startswith(name)]
        if len(starting) == 1:
            return starting[0]
        known = ", ".join(c.name for c in timeline) or "none"
        raise AtlasError(f"{self.out} has no checkpoint {name!r} (checkpoints: {known})")

    def previous(self, current: Checkpoint) -> Checkpoint | None:
        """The newest archived checkpoint of other weights, run before `current`."""
        before = [c for c in self.archived() if c.seq < current.seq and c.digest != current.digest]
        return before[-1] if before else None

    # --- writing ---

    def begin(self, plan: dict | None, model, label: str | None, started: str) -> Checkpoint:
        """The checkpoint this run makes: the one `plan` (the last run's) names when the
        weights are the same, else a new one, after archiving the last run's."""
        last = named_checkpoint(plan)
        if last is not None and last.digest == model.digest:
            return replace(last, label=label or last.label, finished=None, complete=False)
        archived = {c.id: c for c in self.archived()}
        done = last is not None and last.id in archived and archived[last.id].complete
        if last is not None and plan.get("units") and not done:
            self.archive(last, plan)  # its seq is counted below
        seq = max([c.seq for c in archived.values()] + [last.seq if last else 0]) + 1
        return Checkpoint.first(seq, model, label, started)

    def archive(self, checkpoint: Checkpoint, plan: dict) -> Checkpoint:
        """Keep `checkpoint`'s results: the stored records whose key `plan` planned, with
        their first image in blobs/. Complete when every planned unit has one."""
        planned = {(u["layer"], u["index"]): u["key"] for u in plan.get("units", [])}
        records = self.store.records()
        kept = [r for r in records if planned.get((r.layer, r.index)) == r.key]
        slim = []
        for record in kept:
            data = record.as_json()
            if record.status == "done" and record.images:
                data["images"] = [self._blob(self.out / record.images[0])]
            slim.append({name: data.get(name) for name in ARCHIVED})
        facts = replace(
            checkpoint,
            complete=len(kept) == len(planned),
            units=sum(r.status == "done" for r in kept),
        )
        folder = self.root / checkpoint.id
        kept_plan = {k: v for k, v in plan.items() if k not in ("units", "labels", "checkpoint")}
        archive = {"checkpoint": asdict(facts), "plan": kept_plan, "units": slim}
        atomic_write_json(folder / "units.json", archive)
        atomic_write_json(folder / "checkpoint.json", asdict(facts))
        return facts

    def _blob(self, image: Path) -> str:
        """The image's blob (linked, else copied, once per content); its OUT-relative path."""
        data = image.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        blob = self.out / BLOBS / digest[:2] / f"{digest}{image.suffix}"
        if not blob.is_file():
            blob.parent.mkdir(parents=True, exist_ok=True)
            temporary = blob.with_name(f".{blob.name}.tmp")
            temporary.unlink(missing_ok=True)
            try:
                os.link(image, temporary)
            except OSError:
                shutil.copyfile(image, temporary)
            os.replace(temporary, blob)
        return blob.relative_to(self.out).as_posix()

    def keep(self, newest: int) -> list[Checkpoint]:
        """Remove all but the `newest` checkpoints and the blobs no kept one uses; returns
        the removed ones. The facts go first, so a removal cut short leaves no half entry."""
        timeline = self.archived()
        removed = timeline[: max(len(timeline) - newest, 0)]
        for checkpoint in removed:
            folder = self.root / checkpoint.id
            (folder / "checkpoint.json").unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
        if removed:
            used = {
                name
                for checkpoint in timeline[len(removed) :]
                for record in self.units(checkpoint).values()
                for name in record.images
            }
            for blob in (self.out / BLOBS).glob("*/*.webp"):
                if blob.relative_to(self.out).as_posix() not in used:
                    blob.unlink(missing_ok=True)
        return removed

    def view(self, plan: dict | None, units: list[UnitRecord]) -> tuple[list[dict], list]:
        """What the manifest shows of the history: the timeline, oldest first, each
        checkpoint with its layers' mean change, and `units` with their filmstrips (the
        archived checkpoints' frames, then the unit's current image)."""
        current = named_checkpoint(plan)
        archived = [c for c in self.archived() if current is None or c.id != current.id]
        timeline = []
        frames: dict[Key, list[dict]] = {}
        for checkpoint in archived:
            archived_frames = self.frames(checkpoint)
            for key, frame in archived_frames.items():
                frames.setdefault(key, []).append(frame)
            means = _mean_change((key[0], f["change"]) for key, f in archived_frames.items())
            timeline.append({**asdict(checkpoint), "current": False, "mean_change": means})
        if current is not None:
            now = [u for u in units if u.status == "done" and u.images]
            for unit in now:
                frame = {"checkpoint": current.id, "image": unit.images[0], "change": unit.change}
                frames.setdefault((unit.layer, unit.index), []).append(frame)
            means = _mean_change((u.layer, u.change) for u in now)
            timeline.append({**asdict(current), "current": True, "mean_change": means})
        shown = [replace(u, filmstrip=tuple(frames.get((u.layer, u.index), ()))) for u in units]
        return timeline, shown


def describe(timeline: list[dict]) -> str:
    """`atlas history`'s table: one line per checkpoint, oldest first, with its layers' mean
    change against the one before."""
    header = ["checkpoint", "label", "started", "digest", "units", "state", "mean change"]
    rows = []
    for entry in timeline:
        means = [
            f"{layer} {value:.2f}"
            for layer, value in entry["mean_change"].items()
            if value is not None
        ]
        state = "complete" if entry["complete"] else "incomplete"
        rows.append(
            [
                entry["id"],
                entry["label"] or "-",
                entry["started"][:16].replace("T", " ") or "?",
                entry["digest"][:12],
                str(entry["units"]),
                f"{state}, current" if entry["current"] else state,
                ", ".join(means) or "-",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]
        ).rstrip()
        for row in [header, *rows]
    )


def _mean_change(changes: Iterable[tuple[str, float | None]]) -> dict[str, float | None]:
    """Each layer's mean change over its units that have one (None: none has)."""
    by_layer: dict[str, list[float]] = {}
    for layer, change in changes:
        by_layer.setdefault(layer, []).extend([] if change is None else [change])
    return {layer: sum(v) / len(v) if v else None for layer, v in by_layer.items()}


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
