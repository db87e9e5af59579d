"""What the manifest holds of an OUT's history, and `atlas history`'s table: the timeline of its
checkpoints (oldest first, each with its layers' mean change since the one before) and each
unit's filmstrip, one frame per checkpoint that has a picture of it. Reads atlas.history's
archives and the current records; writes nothing. Never imports torch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, replace

from atlas.history import History, Key, named_checkpoint
from atlas.record import UnitRecord


def timeline(
    history: History, plan: dict | None, units: list[UnitRecord]
) -> tuple[list[dict], list]:
    """What the manifest shows of the history: the timeline, oldest first, each
    checkpoint with its layers' mean change, and `units` with their filmstrips: a frame
    per checkpoint that has a picture of the unit (archived, or stored since under the
    current checkpoint), the one made with the unit's shown recipe where there is one."""
    current = named_checkpoint(plan)
    timeline = [c for c in history.archived() if current is None or c.id != current.id]
    timeline += [current] if current is not None else []
    recipes = {(u.layer, u.index): u.recipe_hash for u in units}
    frames: dict[Key, list[dict]] = {}
    entries = []
    for checkpoint in timeline:
        candidates = dict(history.frames(checkpoint))
        is_current = checkpoint is current
        if is_current:
            for unit in units:
                made_now = unit.checkpoint == current.id or (
                    unit.checkpoint is None and unit.status == "done"
                )
                if made_now and unit.status in ("done", "stale") and unit.images:
                    frame = {"checkpoint": current.id, "image": unit.images[0]}
                    frame |= {"change": unit.change, "recipe_hash": unit.recipe_hash}
                    key = (unit.layer, unit.index)
                    candidates[key] = [*candidates.get(key, []), frame]
        chosen = {key: _pick_frame(found, recipes.get(key)) for key, found in candidates.items()}
        for key, frame in chosen.items():
            frames.setdefault(key, []).append(frame)
        facts = asdict(checkpoint)
        if is_current:
            facts["units"] = len(chosen)
        damaged = history.damaged(checkpoint)
        facts["complete"] = facts["complete"] and not damaged
        means = _mean_change((key[0], f["change"]) for key, f in chosen.items())
        entries.append({**facts, "current": is_current, "damaged": damaged, "mean_change": means})
    shown = [replace(u, filmstrip=tuple(frames.get((u.layer, u.index), ()))) for u in units]
    return entries, shown


def _pick_frame(frames: list[dict], recipe_hash: str | None) -> dict:
    """The newest frame made with `recipe_hash`, else the newest, without its recipe."""
    same = [f for f in frames if recipe_hash is not None and f.get("recipe_hash") == recipe_hash]
    frame = (same or frames)[-1]
    return {k: v for k, v in frame.items() if k != "recipe_hash"}


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
        state = "units.json damaged" if entry.get("damaged") else state
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
