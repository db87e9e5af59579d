"""One task on one device: the engine runs, images are encoded, results become small dicts.

This is the code a worker runs; it knows the engine but not Dask, and returns plain data
(numbers and WebP bytes), never tensors, so results travel cheaply to the client that stores
them.
"""

from __future__ import annotations

import math
import time

import torch

from atlas.files import encode_animation, encode_image
from atlas.optim import visualize
from atlas.optim.device import describe_device, resolve_device
from atlas.plan import Task
from atlas.store import downsample


def unit_record(unit, task: Task) -> dict:
    """The fields every stored unit has, done or failed."""
    return {
        "id": unit.id,
        "layer": unit.layer,
        "kind": unit.kind,
        "index": unit.index,
        "label": unit.label,
        "key": unit.key,
        "seed": task.seed,
        "samples": task.samples,
        "recipe": task.recipe.name,
        "recipe_hash": task.recipe.hash,
    }


def visualize_splitting(model, targets: list, task: Task, device: torch.device) -> list:
    """visualize() the batch; on a CUDA out-of-memory error, free memory and do each half
    separately (K images of one unit stay together). Results are the same either way, because
    every image has its own random stream."""
    try:
        return visualize(
            model, targets, task.recipe, seed=task.seed, device=device, timelapse=task.timelapse
        )
    except torch.OutOfMemoryError:
        units = len(targets) // task.samples
        if units <= 1:
            raise
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = (units // 2) * task.samples
    return visualize_splitting(model, targets[:half], task, device) + visualize_splitting(
        model, targets[half:], task, device
    )


def run_task(model, task: Task, device: str | None = None) -> dict:
    """Optimize every unit of `task` (K images each) in one batch. A unit whose objective
    became NaN or infinite is returned as failed; the others are fine."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same shapes run hundreds of times
    targets = [unit.target() for unit in task.units for _ in range(task.samples)]
    started = time.perf_counter()
    results = visualize_splitting(model, targets, task, device)
    seconds = time.perf_counter() - started
    per_unit = seconds / len(task.units)
    outcomes = []
    for position, unit in enumerate(task.units):
        samples = results[position * task.samples : (position + 1) * task.samples]
        main = samples[0]
        record = {
            **unit_record(unit, task),
            "seconds": round(per_unit, 6),
            "steps": len(main.history),
            "device": describe_device(device),
            "image_seeds": [r.seed for r in samples],
        }
        values = [main.objective_start, main.objective_final, main.objective_best]
        if not all(math.isfinite(v) for r in samples for v in r.history):
            outcomes.append(
                {"record": {**record, "status": "failed", "error": "objective became NaN"}}
            )
            continue
        record.update(
            status="done",
            objective_start=values[0],
            objective_final=values[1],
            objective_best=values[2],
            best_step=main.best_step,
            activation=main.activation,
            history=downsample(main.history),
        )
        outcome = {"record": record, "images": [encode_image(r.image) for r in samples]}
        if main.frames:
            outcome["files"] = {"timelapse": encode_animation(main.frames)}
            record["frames_every"] = task.timelapse
        outcomes.append(outcome)
    return {"units": outcomes, "seconds": seconds}
