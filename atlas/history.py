"""Checkpoints: one OUT keeps every checkpoint's results, so a nightly atlas shows how each
unit forms while the model trains.

    OUT/checkpoints/<id>/units.json       an archived checkpoint: its facts and slim unit records
    OUT/checkpoints/<id>/checkpoint.json  its facts alone (the timeline reads only these)
    OUT/blobs/<hh>/<sha256>.webp          archived images by content: identical ones stored once

A checkpoint is one set of weights (its digest) with the date it was first run and an optional
`--label`. units/ holds the newest result of each unit, as it always has, each record naming
the checkpoint that made it; plan.json names the current checkpoint. A checkpoint's archive is
the union of everything ever stored under it, whatever each run planned: every run first merges
what units/ holds into the archives of the checkpoints that made it (blobs are hard links of
its images, so this copies nothing where links work), so no picture is overwritten before it is
archived, and merges again at its end, marking its checkpoint complete when every planned unit
has a result. Only `--keep` removes: the oldest checkpoints and the blobs no kept one uses.

This module reads and writes files only; it never imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from atlas.errors import AtlasError
from atlas.files import atomic_write_json
from atlas.record import RunRecord, UnitRecord

DEFAULT_KEEP = 30
CHECKPOINTS = "checkpoints"
BLOBS = "blobs"
# what an archived unit keeps: enough for a filmstrip frame and for `atlas compare OUT@label`
ARCHIVED = ("id", "layer", "index", "kind", "label", "key", "recipe_hash", "status", "images")
ARCHIVED += ("activation", "change", "change_from", "checkpoint")

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
    run = RunRecord.from_json(plan)
    if run.digest == RunRecord.digest:  # no digest recorded
        return None
    return Checkpoint(
        f"001-{run.digest[:8]}", 1, run.digest, run.spec, run.weights, None, run.started or ""
    )


def named_checkpoint(plan: dict | None) -> Checkpoint | None:
    """The checkpoint a plan.json names (that of an older OUT's plan when it names none)."""
    if not plan:
        return None
    return Checkpoint.from_json(plan.get("checkpoint")) or legacy_checkpoint(plan)


class History:
    """The archived checkpoints of a Store's OUT (damaged files are named as the Store does).

    A checkpoint's archive is the union of every picture ever stored under it: each run
    merges into it what it stored (records carry the id of the checkpoint that made them), and
    nothing is ever dropped from it but by `keep`. A unit with pictures of several recipes
    under one checkpoint keeps them all; its filmstrip shows the one made with the recipe of
    the picture it is shown beside, else the newest."""

    def __init__(self, store):
        self.store = store
        self.out = store.out
        self.root = self.out / CHECKPOINTS
        self._archives: dict[str, tuple[tuple, dict | None]] = {}  # id -> (stat, units.json)
        self._frames: dict[str, tuple[tuple, dict[Key, list[dict]]]] = {}  # id -> (stat, frames)

    # --- reading ---

    def archived(self) -> list[Checkpoint]:
        """Every archived checkpoint, oldest first. A damaged checkpoint.json is rebuilt from
        its units.json; a checkpoint whose two files are both damaged is left out, named."""
        found = []
        for folder in sorted(self.root.glob("*/")) if self.root.is_dir() else []:
            facts = Checkpoint.from_json(_read(folder / "checkpoint.json"))
            if facts is None:
                facts = Checkpoint.from_json((self._archive(folder.name) or {}).get("checkpoint"))
                if facts is None:
                    continue
                atomic_write_json(folder / "checkpoint.json", asdict(facts))
            found.append(facts)
        return sorted(found, key=lambda c: c.seq)

    def _archive(self, checkpoint_id: str) -> dict | None:
        """A checkpoint's units.json, parsed once while it is unchanged (a run rebuilds the
        manifest every minute; the archives do not change meanwhile). None when there is none
        or it is damaged (named: that checkpoint's pictures are then out of reach)."""
        path = self.root / checkpoint_id / "units.json"
        try:
            stat = path.stat()
        except OSError:
            return None
        seen = (stat.st_mtime_ns, stat.st_size)
        if checkpoint_id in self._archives and self._archives[checkpoint_id][0] == seen:
            return self._archives[checkpoint_id][1]
        archive = _read(path)
        if archive is None or not isinstance(archive.get("units", []), list):
            archive = None
            self.store.report(
                path, "is corrupt", "that checkpoint's pictures are left out of the history"
            )
        self._archives[checkpoint_id] = (seen, archive)
        return archive

    def damaged(self, checkpoint: Checkpoint) -> bool:
        """Whether the checkpoint has a units.json that cannot be read."""
        exists = (self.root / checkpoint.id / "units.json").exists()
        return exists and self._archive(checkpoint.id) is None

    def entries(self, checkpoint: Checkpoint) -> list[dict]:
        """Every unit result archived under the checkpoint (slim records), oldest first."""
        units = (self._archive(checkpoint.id) or {}).get("units", [])
        return [u for u in units if isinstance(u, dict) and isinstance(u.get("layer"), str)]

    def units(
        self, checkpoint: Checkpoint, recipe_hash: str | None = None
    ) -> dict[Key, UnitRecord]:
        """An archived checkpoint's units by (layer, index), each its picture made with
        `recipe_hash` where it has one, else its newest; units whose image is gone are left
        out (the filmstrip shows a gap)."""
        found: dict[Key, list[UnitRecord]] = {}
        for data in self.entries(checkpoint):
            try:
                record = UnitRecord.from_json(data)
            except ValueError:
                record = None
            if record is not None and record.images and (self.out / record.images[0]).is_file():
                found.setdefault((record.layer, record.index), []).append(record)
        return {key: _pick(records, recipe_hash) for key, records in found.items()}

    def frames(self, checkpoint: Checkpoint) -> dict[Key, list[dict]]:
        """An archived checkpoint's filmstrip frames by (layer, index), oldest first, each
        with the recipe hash that made it; read without parsing whole records."""
        path = self.root / checkpoint.id / "units.json"
        try:
            stat = path.stat()
        except OSError:
            return {}
        seen = (stat.st_mtime_ns, stat.st_size)
        if checkpoint.id in self._frames and self._frames[checkpoint.id][0] == seen:
            return self._frames[checkpoint.id][1]
        frames: dict[Key, list[dict]] = {}
        for unit in self.entries(checkpoint):
            if unit.get("status", "done") != "done":
                continue
            images, change = unit.get("images"), unit.get("change")
            if not (isinstance(images, list) and images and isinstance(images[0], str)):
                continue
            if (self.out / images[0]).is_file():
                change = change if isinstance(change, int | float) else None
                frame = {"checkpoint": checkpoint.id, "image": images[0], "change": change}
                frame["recipe_hash"] = unit.get("recipe_hash")
                frames.setdefault((unit["layer"], unit.get("index")), []).append(frame)
        self._frames[checkpoint.id] = (seen, frames)
        return frames

    def plan(self, checkpoint: Checkpoint) -> dict:
        """An archived checkpoint's plan.json, less its units and labels."""
        return dict((self._archive(checkpoint.id) or {}).get("plan") or {})

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
        weights are the same, else a new one. Before anything is overwritten, what units/
        holds is merged into the checkpoints that made it (a run killed before its end
        archived nothing)."""
        last = named_checkpoint(plan)
        self.save_stored(last, plan or {})
        if last is not None and last.digest == model.digest:
            return replace(last, label=label or last.label, finished=None, complete=False)
        archived = self.archived()
        seq = max([c.seq for c in archived] + [last.seq if last else 0]) + 1
        return Checkpoint.first(seq, model, label, started)

    def save_stored(self, last: Checkpoint | None, plan: dict) -> None:
        """Merge every stored record into the archive of the checkpoint that made it: `last`
        (the one `plan` names) with `plan`'s units, the others with the plan they kept."""
        records = self.store.records()
        made_under = {r.checkpoint for r in records if r.checkpoint}
        if last is not None:
            self.archive(last, plan, records)
        for checkpoint in self.archived():
            if checkpoint.id in made_under and (last is None or checkpoint.id != last.id):
                kept_plan = {**self.plan(checkpoint), "units": []}
                self.archive(checkpoint, kept_plan, records, complete=checkpoint.complete)

    def archive(
        self,
        checkpoint: Checkpoint,
        plan: dict,
        records: list[UnitRecord] | None = None,
        complete: bool | None = None,
    ) -> Checkpoint:
        """Merge into `checkpoint`'s archive the stored records made under it (those that
        carry its id; in atlases from before records carried one, those whose key `plan`
        planned), each with its first image as a blob. Nothing archived before is dropped.
        Complete when every unit `plan` planned has a result there."""
        planned = {(u["layer"], u["index"]): u["key"] for u in plan.get("units", [])}
        keys = set(planned.values())
        records = self.store.records() if records is None else records
        mine = [
            r
            for r in records
            if r.checkpoint == checkpoint.id or (r.checkpoint is None and r.key in keys)
        ]
        before = self.entries(checkpoint)
        merged = {_identity(entry): entry for entry in before}
        for record in mine:
            entry = self._slim(record, before)
            merged.pop(_identity(entry), None)
            merged[_identity(entry)] = entry  # the newest last
        pictured = {e["key"] for e in merged.values() if e.get("status") == "done"}
        entries = [
            e for e in merged.values() if e.get("status") == "done" or e["key"] not in pictured
        ]
        results = {(e["layer"], e["index"], e["key"]) for e in entries}
        facts = replace(
            checkpoint,
            complete=all((*unit, key) in results for unit, key in planned.items())
            if complete is None
            else complete,
            units=len({(e["layer"], e["index"]) for e in entries if e.get("status") == "done"}),
        )
        folder = self.root / checkpoint.id
        kept_plan = {k: v for k, v in plan.items() if k not in ("units", "labels", "checkpoint")}
        archive = {"checkpoint": asdict(facts), "plan": kept_plan, "units": entries}
        if archive != self._archive(checkpoint.id):
            atomic_write_json(folder / "units.json", archive)
        if Checkpoint.from_json(_read(folder / "checkpoint.json")) != facts:
            atomic_write_json(folder / "checkpoint.json", asdict(facts))
        return facts

    def _slim(self, record: UnitRecord, archived: list[dict]) -> dict:
        """What the archive keeps of a record: its first image as a blob (the blob it is
        already linked to when an archived entry of its key has one)."""
        data = record.as_json()
        if record.status == "done" and record.images:
            linked = [
                e["images"][0]
                for e in archived
                if e.get("key") == record.key
                and e.get("images")
                and isinstance(e["images"][0], str)
            ]
            data["images"] = [self._blob(self.out / record.images[0], linked)]
        return {name: data.get(name) for name in ARCHIVED}

    def _blob(self, image: Path, linked: list[str]) -> str:
        """The image's blob (linked, else copied, once per content); its OUT-relative path.
        A blob the image is a hard link of is found without reading the image."""
        for name in linked:
            with contextlib.suppress(OSError):
                if os.path.samefile(self.out / name, image):
                    return name
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
        the removed ones. The facts go first, so a removal cut short leaves no half entry.
        While a kept checkpoint's archive is damaged no blob is removed: it may be one of
        that checkpoint's pictures."""
        timeline = self.archived()
        removed = timeline[: max(len(timeline) - newest, 0)]
        for checkpoint in removed:
            folder = self.root / checkpoint.id
            (folder / "checkpoint.json").unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
        kept = timeline[len(removed) :]
        if removed and not any(self.damaged(checkpoint) for checkpoint in kept):
            used = {
                name
                for checkpoint in kept
                for entry in self.entries(checkpoint)
                for name in entry.get("images") or []
            }
            for blob in (self.out / BLOBS).glob("*/*.webp"):
                if blob.relative_to(self.out).as_posix() not in used:
                    blob.unlink(missing_ok=True)
        return removed


def _identity(entry: dict) -> tuple:
    """An archived result is one picture of one unit's key (or a failure of the key)."""
    images = entry.get("images") or [None]
    return (entry.get("layer"), entry.get("index"), entry.get("key"), images[0])


def _pick(records: list[UnitRecord], recipe_hash: str | None) -> UnitRecord:
    """The newest of `records` made with `recipe_hash`, else the newest."""
    same = [r for r in records if recipe_hash is not None and r.recipe_hash == recipe_hash]
    return (same or records)[-1]


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
