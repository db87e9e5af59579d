"""`atlas visualize --grow`: a channel objective grown position by position over its map.

Frame k maximizes the mean of the channel over the first k positions of its map in reading
order (the full rows above and the current row up to its column), so watching the frames shows
how the whole image changes as each neuron joins. All frames of a target share one random
stream: they start from the same image and see the same transforms, so what differs between
neighbouring frames is the one neuron that joined. That stream is the one a plain run of the
channel target gets, so the last frame (the whole map) is the target's ordinary image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from atlas.errors import AtlasError
from atlas.files import (
    atomic_write_bytes,
    atomic_write_json,
    encode_animation,
    encode_image,
    safe_name,
)
from atlas.layers import resolve
from atlas.optim.loop import (
    UnitResult,
    check_targets,
    image_seed,
    visualize,
)
from atlas.optim.objectives import Objective, Target, as_objective, region
from atlas.optim.recipes import Recipe
from atlas.results import run_record


def map_size(model, target: Target) -> tuple[int, int]:
    """The (H, W) map that `target` grows over; AtlasError for anything but a channel of a
    layer with a spatial map (there is no order of positions to grow along otherwise)."""
    if target.kind != "channel":
        raise AtlasError(
            f"--grow needs a channel target LAYER:CHANNEL, not the {target.kind} {target.id}"
        )
    shape = resolve(model, target.layer).shape
    if len(shape) != 3:
        raise AtlasError(
            f"--grow needs a layer with a spatial map; {target.layer} has shape "
            f"{'x'.join(str(n) for n in shape)}"
        )
    height, width = shape[-2:]
    return int(height), int(width)


def check(model, targets: Sequence[Target]) -> None:
    """Raise AtlasError before any work for a target that cannot be grown or is out of range."""
    for target in targets:
        map_size(model, target)
    check_targets(model, targets)


def prefix_objective(target: Target, k: int, height: int, width: int) -> Objective:
    """The mean of `target`'s channel over its first k positions in reading order: a region of
    the full rows above plus a region of the current row, each weighted by its share of k."""
    if not 1 <= k <= height * width:
        raise ValueError(f"k must be 1-{height * width} for a {height}x{width} map, not {k}")
    rows, columns = divmod(k, width)

    def part(box: tuple[int, int, int, int]) -> Target:
        return region(target.layer, target.index, box, negative=target.negative)

    shares = []
    if rows:
        shares.append((rows * width / k) * part((0, rows, 0, width)))
    if columns:
        shares.append((columns / k) * part((rows, rows + 1, 0, columns)))
    return sum(shares[1:], shares[0])


def frame_counts(positions: int, every: int = 1) -> list[int]:
    """The prefixes kept: every `every`-th one, and always the whole map last."""
    if every < 1:
        raise AtlasError("--grow-step must be at least 1")
    kept = list(range(every, positions + 1, every))
    if not kept or kept[-1] != positions:
        kept.append(positions)
    return kept


def _frame_record(result: UnitResult, k: int, width: int, images: list[str]) -> dict:
    row, column = divmod(k - 1, width)  # the position that joined in this frame
    return {
        "k": k,
        "position": [row, column],
        "objective": result.id,
        "images": images,
        "objective_start": result.objective_start,
        "objective_final": result.objective_final,
        "objective_best": result.objective_best,
        "best_step": result.best_step,
        "activation": result.activation,
    }


def write_growth(
    model,
    targets: Sequence[Target],
    recipe: Recipe,
    out: Path,
    *,
    every: int = 1,
    batch: int = 0,
    seed: int = 0,
    device: str | None = None,
    formats: Sequence[str] = ("webp",),
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Grow each channel target over its map: one image per kept prefix, all targets' frames
    optimized together (in chunks of `batch` images when it is > 0, else in one batch), each
    frame written as `<target>.grow.<k>.<fmt>`, all of a target's frames as the animated WebP
    `<target>.grow.webp`, and results.json listing every frame with its objective values."""
    targets = list(dict.fromkeys(targets))  # a repeated target would overwrite its own frames
    plans = []  # (target, (H, W), kept prefixes, stream)
    for target in targets:
        height, width = map_size(model, target)
        stream = image_seed(seed, as_objective(target), 0)  # the plain channel run's stream
        plans.append((target, (height, width), frame_counts(height * width, every), stream))
    objectives, streams = [], []
    for target, (height, width), kept, stream in plans:
        objectives += [prefix_objective(target, k, height, width) for k in kept]
        streams += [stream] * len(kept)

    size = batch if batch > 0 else len(objectives)
    chunks = range(0, len(objectives), size)
    started = time.time()
    results: list[UnitResult] = []
    for number, first in enumerate(chunks):
        step_of = _chunk_progress(on_step, number, len(chunks))
        results += visualize(
            model,
            objectives[first : first + size],
            recipe,
            seed=seed,
            device=device,
            on_step=step_of,
            streams=streams[first : first + size],
        )
    seconds = time.time() - started

    records, position = [], 0
    for target, (height, width), kept, stream in plans:
        stem = safe_name(target.id)
        digits = len(str(height * width))
        frames, images = [], []
        for k in kept:
            result = results[position]
            position += 1
            names = [f"{stem}.grow.{k:0{digits}d}.{fmt}" for fmt in formats]
            for name, fmt in zip(names, formats, strict=True):
                atomic_write_bytes(out / name, encode_image(result.image, fmt))
            frames.append(_frame_record(result, k, width, names))
            images.append(result.image)
        animation = f"{stem}.grow.webp"
        atomic_write_bytes(out / animation, encode_animation(images))
        records.append(
            {
                "id": target.id,
                "layer": target.layer,
                "kind": target.kind,
                "index": target.index,
                "map": [height, width],
                "grow_step": every,
                "seed": stream,
                "animation": animation,
                "frames": frames,
            }
        )
    run = run_record(model, recipe, seconds, device, seed=seed, grow=True)
    summary = {**run.as_json(), "units": records}
    atomic_write_json(out / "results.json", summary)
    return summary


def describe(summary: dict) -> list[str]:
    """One line per grown target, then the totals: what `atlas visualize --grow` prints."""
    lines, frames = [], 0
    for unit in summary["units"]:
        first, last = unit["frames"][0], unit["frames"][-1]
        frames += len(unit["frames"])
        height, width = unit["map"]
        lines.append(
            f"{unit['id']}: {len(unit['frames'])} frames over its {height}x{width} map, "
            f"objective {first['objective_best']:.3f} (k={first['k']}) -> "
            f"{last['objective_best']:.3f} (k={last['k']}), {unit['animation']}"
        )
    lines.append(f"{frames} frames of {len(summary['units'])} units in {summary['seconds']:.1f} s")
    return lines


def _chunk_progress(
    on_step: Callable[[int, int], None] | None, number: int, chunks: int
) -> Callable[[int, int], None] | None:
    """Step progress of one chunk as progress over all chunks."""
    if on_step is None:
        return None

    def update(done: int, total: int) -> None:
        on_step(number * total + done, chunks * total)

    return update
