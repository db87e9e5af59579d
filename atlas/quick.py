"""`atlas visualize`: a few units at once, for trying settings quickly (no Dask, no store)."""

from __future__ import annotations

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


def result_record(result: UnitResult, image_names: list[str], model) -> dict:
    """The numbers of one unit, as written next to its image."""
    target = result.target
    label = None
    if target is not None and target.kind == "logit" and model.labels:
        label = model.labels[target.index]
    return {
        "id": result.id,
        "layer": target.layer if target else None,
        "kind": target.kind if target else "objective",
        "index": target.index if target else None,
        "label": label,
        "images": image_names,
        "objective_start": result.objective_start,
        "objective_final": result.objective_final,
        "objective_best": result.objective_best,
        "best_step": result.best_step,
        "history": result.history,
        "seed": result.seed,
    }


def run(
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
    and with `timelapse` N an animated WebP per image of a frame every N steps."""
    batch = [target for target in targets for _ in range(samples)]
    started = time.time()
    results = visualize(
        model, batch, recipe, seed=seed, device=device, on_step=on_step, timelapse=timelapse
    )
    seconds = time.time() - started
    records = []
    for first in range(0, len(results), samples):
        group = results[first : first + samples]
        names_per_sample, animations = [], []
        for k, result in enumerate(group):
            stem = safe_name(result.id) + (f".{k}" if samples > 1 else "")
            for fmt in formats:
                atomic_write_bytes(out / f"{stem}.{fmt}", encode_image(result.image, fmt))
            names_per_sample.append([f"{stem}.{fmt}" for fmt in formats])
            if result.frames:
                animations.append(f"{stem}.timelapse.webp")
                atomic_write_bytes(out / animations[-1], encode_animation(result.frames))
        record = result_record(group[0], sum(names_per_sample, []), model)
        if animations:
            record["timelapse"] = animations
        if samples > 1:
            record["samples"] = [
                result_record(r, names, model)
                for r, names in zip(group, names_per_sample, strict=True)
            ]
        records.append(record)
    summary = {**run_facts(model, recipe, seconds, device), "units": records}
    atomic_write_json(out / "results.json", summary)
    return summary


def run_facts(model, recipe: Recipe, seconds: float, device: str | None) -> dict:
    """What results.json says about a run beside its units: model, recipe, time, versions."""
    return {
        "model": model.spec,
        "weights_digest": model.digest,
        "recipe": recipe.name,
        "recipe_hash": recipe.hash,
        "steps": recipe.steps,
        "seconds": round(seconds, 3),
        "device": str(resolve_device(device)),
        "atlas_version": atlas.__version__,
        "torch_version": torch.__version__,
    }
