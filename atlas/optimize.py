"""One task on one device: the engine runs, images are encoded, results become UnitRecords.

This is the code a worker runs; it knows the engine but not Dask, and returns plain data
(numbers and WebP bytes), never tensors, so results travel cheaply to the client that stores
them.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time

import torch

from atlas.analysis import analyse
from atlas.change import against_previous
from atlas.files import decode_image, encode_animation, encode_image
from atlas.optim import visualize
from atlas.optim.device import describe_device, resolve_device
from atlas.plan import Task
from atlas.record import VARIANT_FILE, UnitRecord, optimization_facts

CALIBRATION_STEPS = 3  # time_task: a warm-up and two timed steps
# What a task costs besides its plain steps, in plain steps of its batch (measured here: the
# analyses 2 for Lite0 to 5.5 for ResNet-50; the recipe's first `redirect_relu` = 8 steps a
# host sync per ReLU, 1.3x to 2x a plain step). Timing it would cost a calibration more than
# its steps do, for 1-2% of a 512-step unit.
OVERHEAD_STEPS = 8


def unit_record(unit, task: Task, **facts) -> UnitRecord:
    """The record of one of the task's units, done or failed, with `facts` of its outcome."""
    return UnitRecord(
        layer=unit.layer,
        index=unit.index,
        kind=unit.kind,
        id=unit.id,
        label=unit.label,
        direction=None if unit.learned is None else unit.learned.record,
        key=unit.key,
        seed=task.seed,
        samples=task.samples,
        recipe=task.recipe.name,
        recipe_hash=task.recipe.hash,
        **facts,
    )


def images_per_unit(task: Task) -> int:
    """K samples, then one image per variant: a unit's images stay together in a batch."""
    return task.samples + len(task.units[0].variants)


def task_targets(task: Task) -> list:
    """The batch of a task: each unit's K samples, then its variants."""
    return [
        target
        for unit in task.units
        for target in [unit.target()] * task.samples + unit.variant_targets()
    ]


def unit_groups(results: list, task: Task) -> list[list]:
    """The results of `task_targets(task)`, one list per unit."""
    per_unit = images_per_unit(task)
    return [results[first : first + per_unit] for first in range(0, len(results), per_unit)]


def analyse_samples(model, task: Task, groups: list[list]) -> list:
    """What each unit of `task` is for (atlas.analysis), measured on its K samples."""
    samples = [result for group in groups for result in group[: task.samples]]
    return analyse(
        model,
        [result.target for result in samples],
        [result.image for result in samples],
        [result.start for result in samples],
        task.samples,
        task.inputs_from,
    )


def visualize_splitting(model, targets: list, task: Task, device: torch.device) -> list:
    """visualize() the batch; on a CUDA out-of-memory error, free memory and do each half
    separately (a unit's images stay together). Each image keeps its own random stream, so
    the halves give pictures that drive their units as the whole batch's would (see
    atlas.optim.loop)."""
    try:
        return visualize(
            model, targets, task.recipe, seed=task.seed, device=device, timelapse=task.timelapse
        )
    except torch.OutOfMemoryError:
        units = len(targets) // images_per_unit(task)
        if units <= 1:
            raise
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = (units // 2) * images_per_unit(task)
    return visualize_splitting(model, targets[:half], task, device) + visualize_splitting(
        model, targets[half:], task, device
    )


def optimize_task(model, task: Task, device: str | None = None) -> dict:
    """Optimize every unit of `task` (K images each, and its variants) in one batch, then
    measure what each is for (atlas.analysis: inputs, class effects, maps). A unit whose
    objective became NaN or infinite is returned as failed; the others are fine."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same shapes run hundreds of times
    started = time.perf_counter()
    results = visualize_splitting(model, task_targets(task), task, device)
    groups = unit_groups(results, task)
    analyses = analyse_samples(model, task, groups)
    encoded = [[encode_image(r.image) for r in group[: task.samples]] for group in groups]
    changes = _changes(model, task, encoded)
    seconds = time.perf_counter() - started
    outcomes = []
    for unit, group, analysis, images, change in zip(
        task.units, groups, analyses, encoded, changes, strict=True
    ):
        facts = {
            "seconds": round(seconds / len(task.units), 6),
            "device": describe_device(device),
            "image_seeds": tuple(r.seed for r in group[: task.samples]),
        }
        if not all(math.isfinite(v) for r in group for v in r.history):
            error = "objective became NaN"
            steps = len(group[0].history)
            failed = unit_record(unit, task, status="failed", error=error, steps=steps, **facts)
            outcomes.append({"record": failed})
            continue
        if change is not None:
            facts.update(change=change, change_from=task.previous_from)
        outcomes.append(_done(unit, task, group, analysis, images, facts))
    return {"units": outcomes, "seconds": seconds}


def _changes(model, task: Task, encoded: list[list[bytes]]) -> list[float | None]:
    """Each unit's change since the previous checkpoint (None: it had no image there, or
    the score is undefined), measured on the images as stored."""
    if not task.previous:
        return [None] * len(task.units)
    have = [i for i, previous in enumerate(task.previous) if previous is not None]
    images = [decode_image(encoded[i][0]) for i in have]
    previous = [decode_image(task.previous[i], like) for i, like in zip(have, images, strict=True)]
    scores = against_previous(model, [task.units[i].target() for i in have], images, previous)
    changes: list[float | None] = [None] * len(task.units)
    for i, score in zip(have, scores, strict=True):
        changes[i] = round(score, 5) if math.isfinite(score) else None
    return changes


def _done(unit, task: Task, group: list, analysis, images: list[bytes], facts: dict) -> dict:
    """A finished unit's record, its K images and its other files (maps, animation,
    variants)."""
    main = group[0]
    record = unit_record(
        unit,
        task,
        **optimization_facts(main),
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
    for name, result in zip(unit.variants, group[task.samples :], strict=True):
        files[f"{VARIANT_FILE}{name}"] = encode_image(result.image)
    return {"record": record, "images": images, "files": files}


def time_task(
    model, task: Task, steps: int = CALIBRATION_STEPS, device: str | None = None
) -> float:
    """Seconds per unit of `task` at its recipe's steps, from a few timed steps of its batch
    (its K samples and variants), scaled: the first step is a warm-up, the others' median
    (robust to other load on a shared machine) stands for every step, plus OVERHEAD_STEPS.
    What `atlas plan` estimates with when OUT has no timings of earlier runs."""
    device = resolve_device(device)
    redirect = min(task.recipe.redirect_relu, 1)  # the warm-up only: the timed steps are plain
    recipe = task.recipe.replace(steps=steps, octaves=(), redirect_relu=redirect)
    stamps: list[float] = []
    visualize(
        model,
        task_targets(task),
        recipe,
        device=device,
        on_step=lambda *_: stamps.append(time.perf_counter()),
    )
    per_step = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    return per_step * (task.recipe.steps + OVERHEAD_STEPS) / len(task.units)


def calibration_task(model, task: Task) -> dict:
    """`time_task` as an executor's task: timed where the run's tasks would be computed (a
    GPU worker of the cluster gives GPU figures)."""
    return {"seconds_per_unit": time_task(model, task)}
