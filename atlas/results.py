"""What `atlas visualize` writes: a few units' pictures and results.json (a RunRecord with its
unit records) into a folder, for trying settings quickly (no Dask, no store)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import atlas
from atlas.files import (
    atomic_write_bytes,
    atomic_write_json,
    encode_animation,
    encode_image,
    safe_name,
)
from atlas.optim import Recipe, Target, visualize
from atlas.optim.device import resolve_device
from atlas.optim.loop import UnitResult
from atlas.record import RunRecord, UnitRecord, optimization_facts


def record_of(
    results: list[UnitResult], images: list[str], animation: str | None, model, **facts
) -> UnitRecord:
    """The record of one unit's K images, as written to results.json: the numbers are those
    of the first image, and the animation is the first image's, as `atlas run` stores them."""
    main = results[0]
    target = main.target
    label = model.labels[target.index] if target.kind == "logit" and model.labels else None
    return UnitRecord(
        layer=target.layer,
        index=target.index,
        kind=target.kind,
        id=main.id,
        label=label,
        samples=len(results),
        image_seeds=tuple(r.seed for r in results),
        images=tuple(images),
        timelapse=animation,
        **optimization_facts(main),
        **facts,
    )


def write_results(
    model,
    targets: Sequence[Target],
    recipe: Recipe,
    out: Path,
    *,
    samples: int = 1,
    seed: int = 0,
    device: str | None = None,
    formats: Sequence[str] = ("webp",),
    on_step: Callable[[int, int], None] | None = None,
    timelapse: int = 0,
) -> dict:
    """Visualize `targets` (each `samples` times) in one batch; write images and results.json,
    and with `timelapse` N an animated WebP of the first image of each unit, a frame every N
    steps."""
    batch = [target for target in targets for _ in range(samples)]
    started = time.time()
    results = visualize(
        model, batch, recipe, seed=seed, device=device, on_step=on_step, timelapse=timelapse
    )
    seconds = time.time() - started
    records = []
    for first in range(0, len(results), samples):
        group = results[first : first + samples]
        names, animation = [], None
        for k, result in enumerate(group):
            stem = safe_name(result.id) + (f".{k}" if samples > 1 else "")
            for fmt in formats:
                atomic_write_bytes(out / f"{stem}.{fmt}", encode_image(result.image, fmt))
                names.append(f"{stem}.{fmt}")
            if k == 0 and result.frames:
                animation = f"{stem}.timelapse.webp"
                atomic_write_bytes(out / animation, encode_animation(result.frames))
        every = timelapse if animation else None
        record = record_of(group, names, animation, model, seed=seed, frames_every=every)
        records.append(record.as_json())
    run = run_record(model, recipe, seconds, device, samples=samples, seed=seed)
    summary = {**run.as_json(), "units": records}
    atomic_write_json(out / "results.json", summary)
    return summary


def run_record(model, recipe: Recipe, seconds: float, device: str | None, **facts) -> RunRecord:
    """What results.json says about a run beside its units: model, recipe, time, versions."""
    return RunRecord(
        spec=model.spec,
        digest=model.digest,
        weights=model.weights or None,
        preprocessing=model.preprocessing_facts(),
        recipe=recipe.name,
        recipe_hash=recipe.hash,
        recipe_settings=dataclasses.asdict(recipe),
        seconds=round(seconds, 3),
        device=str(resolve_device(device)),
        atlas_version=atlas.__version__,
        torch_version=torch.__version__,
        **facts,
    )
