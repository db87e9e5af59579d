"""One task on one device: the engine runs, images are encoded, results become UnitRecords.

This is the code a worker runs; it knows the engine but not Dask, and returns plain data
(numbers and WebP bytes), never tensors, so results travel cheaply to the client that stores
them.
"""

from __future__ import annotations

import math
import time

import torch

from atlas.analysis import analyse
from atlas.files import encode_animation, encode_image
from atlas.optim import visualize
from atlas.optim.device import describe_device, resolve_device
from atlas.plan import Task
from atlas.record import UnitRecord, downsample


def unit_record(unit, task: Task, **facts) -> UnitRecord:
    """The record of one of the task's units, done or failed, with `facts` of its outcome."""
    return UnitRecord(
        layer=unit.layer,
        index=unit.index,
        kind=unit.kind,
        label=unit.label,
        key=unit.key,
        seed=task.seed,
        samples=task.samples,
        recipe=task.recipe.name,
        recipe_hash=task.recipe.hash,
        **facts,
    )


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
    """Optimize every unit of `task` (K images each) in one batch, then measure what each is
    for (atlas.analysis: inputs, class effects, maps). A unit whose objective became NaN or
    infinite is returned as failed; the others are fine."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same shapes run hundreds of times
    targets = [unit.target() for unit in task.units for _ in range(task.samples)]
    started = time.perf_counter()
    results = visualize_splitting(model, targets, task, device)
    analyses = analyse(
        model,
        targets,
        [r.image for r in results],
        [r.start for r in results],
        task.samples,
        task.inputs_from,
    )
    seconds = time.perf_counter() - started
    per_unit = seconds / len(task.units)
    outcomes = []
    for position, unit in enumerate(task.units):
        samples = results[position * task.samples : (position + 1) * task.samples]
        main, analysis = samples[0], analyses[position]
        facts = {
            "seconds": round(per_unit, 6),
            "steps": len(main.history),
            "device": describe_device(device),
            "image_seeds": tuple(r.seed for r in samples),
        }
        if not all(math.isfinite(v) for r in samples for v in r.history):
            failed = unit_record(unit, task, status="failed", error="objective became NaN", **facts)
            outcomes.append({"record": failed})
            continue
        record = unit_record(
            unit,
            task,
            objective_start=main.objective_start,
            objective_final=main.objective_final,
            objective_best=main.objective_best,
            best_step=main.best_step,
            activation=main.activation,
            history=tuple(map(tuple, downsample(main.history))),
            frames_every=task.timelapse if main.frames else None,
            inputs_from=task.inputs_from,
            inputs=analysis.inputs,
            classes=analysis.classes,
            map_range=analysis.map_range,
            **facts,
        )
        files = {"maps": analysis.maps} if analysis.maps else {}
        if main.frames:
            files["timelapse"] = encode_animation(main.frames)
        images = [encode_image(r.image) for r in samples]
        outcomes.append({"record": record, "images": images, "files": files})
    return {"units": outcomes, "seconds": seconds}
