"""The nightly history as the pages show it: the checkpoints of an OUT (one per set of weights
it was run with, oldest first), each unit's filmstrip across them, and its change since the
previous checkpoint (atlas.change's score: 0 unchanged, 1 the earlier picture drives the unit
no more than a grey image does).

The store writes manifest["checkpoints"] and each unit's "filmstrip", "change" and
"change_from"; this module reads them tolerantly, so that an older atlas (no checkpoints) or a
damaged entry shows no history rather than a failed page. One checkpoint is no history: the
pages show the history only from two on (see timeline). This module imports neither torch, nor
Jinja2, nor Pillow (atlas.site.linking links the frames' images and reads their sizes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from atlas.record import UnitRecord

PLOT_WIDTH, PLOT_HEIGHT = 480, 120
DIGEST_SHOWN = 8  # hex digits of a weights digest in the timeline
CHANGE_SORT = "change-high"  # the layer grid's sort by change, most changed first


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint as the pages show it (an entry of manifest["checkpoints"])."""

    id: str
    label: str | None = None
    digest: str = ""
    started: str = ""
    complete: bool = True
    current: bool = False
    units: int | None = None  # units done in it
    mean_change: dict[str, float | None] = field(default_factory=dict)  # by layer

    @property
    def name(self) -> str:
        """How people call it: its label, else its id."""
        return self.label or self.id

    @property
    def date(self) -> str:
        """When it was run, to the minute ("2026-11-30 02:00"); the full stamp is `started`."""
        return self.started[:16].replace("T", " ")

    @property
    def digest_prefix(self) -> str:
        return self.digest[:DIGEST_SHOWN]


@dataclass(frozen=True)
class Frame:
    """One picture of a unit in its filmstrip. `image` is its file in OUT as the manifest names
    it; `src` its link in the site (relative to the layer folder) once atlas.site linked it,
    None for a gap (the file is gone or damaged)."""

    checkpoint: CheckpointEntry
    change: float | None  # against the frame before it
    image: str | None
    position: int | None = None  # in the timeline; None: a checkpoint the timeline lacks
    src: str | None = None
    size: tuple[int, int] = (0, 0)

    @property
    def caption(self) -> str:
        """One line for the large picture when this frame is shown there."""
        parts = [self.checkpoint.name, self.checkpoint.date]
        if self.change is not None:
            parts.append(f"change {self.change:.2f}")
        if not self.checkpoint.complete:
            parts.append("incomplete")
        if self.checkpoint.current:
            parts.append("current")
        return " · ".join(part for part in parts if part)


def score(value: object) -> float | None:
    """A change score as the pages use it: a finite number, else None (not measured, or a
    value of the wrong type, which then sorts and plots as unmeasured instead of failing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def timeline(manifest: dict) -> list[CheckpointEntry]:
    """The manifest's checkpoints, oldest first, when there are two or more (one checkpoint is
    no history: the pages stay as they were); entries with no string id are left out."""
    entries = manifest.get("checkpoints")
    found = [_checkpoint(entry) for entry in entries] if isinstance(entries, list) else []
    found = [checkpoint for checkpoint in found if checkpoint is not None]
    return found if len(found) > 1 else []


def _checkpoint(entry: object) -> CheckpointEntry | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        return None
    means = entry.get("mean_change")
    units = entry.get("units")
    return CheckpointEntry(
        entry["id"],
        entry["label"] if isinstance(entry.get("label"), str) else None,
        entry["digest"] if isinstance(entry.get("digest"), str) else "",
        entry["started"] if isinstance(entry.get("started"), str) else "",
        entry.get("complete") is not False,  # only an explicit false is incomplete
        entry.get("current") is True,
        units if type(units) is int else None,
        {str(k): score(v) for k, v in means.items()} if isinstance(means, dict) else {},
    )


def last_step(
    checkpoints: Sequence[CheckpointEntry],
) -> tuple[CheckpointEntry, CheckpointEntry] | None:
    """The checkpoint before the one the site shows (the current one, else the newest), and
    that one: what "change since the previous checkpoint" compares. None without a history."""
    if not checkpoints:
        return None
    current = next((c for c in checkpoints if c.current), checkpoints[-1])
    position = checkpoints.index(current)
    return checkpoints[max(position - 1, 0)], current


def filmstrip(record: UnitRecord, checkpoints: Sequence[CheckpointEntry]) -> list[Frame]:
    """The record's frames, oldest first, each with its checkpoint (one the timeline does not
    list is known by its id alone). Entries that are no frame are left out; an entry whose
    image is no string is a gap."""
    known = {
        checkpoint.id: (position, checkpoint) for position, checkpoint in enumerate(checkpoints)
    }
    frames = []
    for entry in record.filmstrip:
        if not isinstance(entry, dict) or not isinstance(entry.get("checkpoint"), str):
            continue
        position, checkpoint = known.get(entry["checkpoint"], (None, None))
        image = entry.get("image")
        frames.append(
            Frame(
                checkpoint or CheckpointEntry(entry["checkpoint"]),
                score(entry.get("change")),
                image if isinstance(image, str) else None,
                position,
            )
        )
    return frames


def change_dots(
    frames: Iterable[Frame], checkpoints: int, width: int = PLOT_WIDTH, height: int = PLOT_HEIGHT
) -> list[tuple[float, float, Frame]]:
    """(x, y, frame) of each frame with a change score, in an SVG box of `width` x `height`:
    x the frame's checkpoint along the timeline (so that checkpoints a unit missed show as
    room between its dots), y its score from 0 (bottom) to 1 (top), clipped to the box."""
    span = max(checkpoints - 1, 1)
    return [
        (
            round(frame.position / span * width, 1),
            round(height - min(max(frame.change, 0.0), 1.0) * height, 1),
            frame,
        )
        for frame in frames
        if frame.change is not None and frame.position is not None
    ]
