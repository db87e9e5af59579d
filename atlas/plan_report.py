"""`atlas plan`: what a run would do, per layer, with an estimated time.

Layers that no earlier run in OUT has timings of are timed where the run would compute them:
one task's batch for a few steps, on a worker of the configured scheduler or cluster (a GPU
worker gives GPU figures; `--scheduler inline` times in this process), once per distinct layer
shape: layers of equal shape share the figure of the middle one of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from atlas.errors import AtlasError
from atlas.estimate import estimate, unmeasured_layers
from atlas.execute import executor, visible_gpus
from atlas.learning import Learning
from atlas.optimize import calibration_task
from atlas.plan import Plan, load_and_plan, make_plan, make_tasks, units_per_task
from atlas.progress import Progress, format_duration
from atlas.record import split_layer
from atlas.rekey import made_before_keying
from atlas.store import Store

WHAT = "layer shapes"  # what the progress line counts


def shape_groups(plan: Plan, layers: list[str]) -> dict[str, list[str]]:
    """The layer to time for each distinct output shape among `layers` (a learned layer's: its
    real layer's), with the layers its figure stands for: the middle one, whose depth is their
    mean when they follow each other (a deeper layer costs more: its forward and backward
    passes are longer)."""
    info = {layer.name: layer for layer in plan.layers}
    groups: dict[tuple, list[str]] = {}
    for name in layers:
        # a concept or a cell costs what a channel of its real layer does, at its own steps
        real, part = split_layer(name)
        groups.setdefault((info[real].kind, tuple(info[real].shape), part), []).append(name)
    return {members[len(members) // 2]: members for members in groups.values()}


def calibrate(
    config,
    model,
    plan: Plan,
    layers: list[str],
    on_progress: Callable[[Progress], None] | None = None,
    on_cluster: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], str, list[str]]:
    """Seconds per unit of each of `layers` (those whose timing failed are left out), the
    device they were timed on, and what failed."""
    groups = shape_groups(plan, layers)
    timings: dict[str, float] = {}
    failures: list[str] = []
    with executor(config, model, on_cluster) as pool:
        started = time.monotonic()
        tasks = []
        for layer in groups:
            units = [unit for unit in plan.units if unit.layer == layer]
            tasks.append(make_tasks(plan, units, pool.device)[0])
        for done, outcome in enumerate(pool.map(calibration_task, tasks), 1):
            if outcome.error is None:
                for member in groups[outcome.task.layer]:
                    timings[member] = outcome.result["seconds_per_unit"]
            else:
                failures.append(f"{outcome.task.layer}: {outcome.error}")
            if on_progress:
                elapsed = time.monotonic() - started
                on_progress(Progress(done, len(failures), len(tasks), elapsed, WHAT))
        return timings, pool.device, failures


def plan_summary(
    config,
    *,
    calibrate_layers: bool,
    on_progress: Callable[[Progress], None] | None = None,
    on_cluster: Callable[[str], None] | None = None,
) -> dict:
    """Units, tasks, units still to do and estimated seconds per layer, as plain data; with
    `calibrate_layers`, the layers without earlier timings are timed (`calibrate`)."""
    model, plan = load_and_plan(config)
    store = Store(config.out)
    learning = Learning.for_run(config, model, plan, store)  # reads what OUT has learned
    if learning is not None:
        plan = make_plan(config, model, learned=learning.stored())
    try:
        previous = store.read_plan()
    except AtlasError:  # a damaged plan.json: the run rewrites it and keeps nothing from before
        previous = None
    kept = {} if config.force else made_before_keying(store, plan, model, previous)
    todo = [u for u in store.pending(plan.units, config.force) if (u.layer, u.index) not in kept]
    records = store.records()
    timings, failures = {}, []
    device = "cuda" if visible_gpus() else "cpu"
    todo_layers = {unit.layer for unit in todo}
    unmeasured = [layer for layer in unmeasured_layers(plan, records) if layer in todo_layers]
    if calibrate_layers and unmeasured:
        timings, device, failures = calibrate(
            config, model, plan, unmeasured, on_progress, on_cluster
        )
    all_tasks = make_tasks(plan, list(plan.units), device)
    todo_tasks = make_tasks(plan, todo, device)
    estimates = {e.layer: e for e in estimate(plan, records, timings)}
    layers = []
    for layer, units in plan.units_per_layer().items():
        left = sum(1 for unit in todo if unit.layer == layer)
        per_unit = estimates[layer].seconds_per_unit
        layers.append(
            {
                "layer": layer,
                "units": units,
                "tasks": sum(1 for task in all_tasks if task.layer == layer),
                "todo": left,
                "todo_tasks": sum(1 for task in todo_tasks if task.layer == layer),
                "seconds_per_unit": per_unit,
                "estimated_seconds": None if per_unit is None else per_unit * left,
                "estimate_from": estimates[layer].source if left else "nothing to do",
            }
        )
    unlearned = learning.missing() if learning is not None else []
    for name, units, up_to in unlearned:
        row = _unlearned(name, units, up_to, plan, device, estimates)
        layers.insert(_after(layers, split_layer(name)[0]), row)
    known = [row["estimated_seconds"] for row in layers if row["todo"]]
    recipe = config.recipe
    return {
        "model": model.spec,
        "digest": model.digest,
        "recipe": recipe.name,
        "steps": recipe.steps,
        "size": recipe.size,
        "samples": config.samples,
        "seed": config.seed,
        "device": device,
        "units": len(plan.units) + sum(units for _, units, _ in unlearned),
        "todo": len(todo) + sum(units for _, units, _ in unlearned),
        "up_to": any(up_to for *_, up_to in unlearned),  # cells not learned yet
        "kept_from_before": len(kept),
        "tasks": len(todo_tasks) + sum(row["tasks"] for row in layers if "up_to" in row),
        "estimated_seconds": None if None in known else sum(known),
        "calibration_failures": failures,
        "layers": layers,
    }


def _after(rows: list[dict], layer: str) -> int:
    """Where a row of `layer`'s concepts or atlas goes: after the rows of the layer."""
    return max(i for i, row in enumerate(rows) if split_layer(row["layer"])[0] == layer) + 1


def _unlearned(name: str, units: int, up_to: bool, plan, device: str, estimates) -> dict:
    """A row of concepts or cells not learned yet (atlas.learning): K of them, or up to N x N,
    each costing what a channel of its real layer does, at their own steps (--concept-steps)."""
    real = split_layer(name)[0]
    channel = estimates[real].seconds_per_unit if real in estimates else None
    config = plan.config
    ratio = config.recipe_for(True).steps / config.recipe.steps
    per_unit = None if channel is None else channel * ratio
    tasks = -(
        -units // units_per_task(config, next(i for i in plan.layers if i.name == real), device)
    )
    return {
        "layer": name,
        "units": units,
        "up_to": up_to,
        "tasks": tasks,
        "todo": units,
        "todo_tasks": tasks,
        "seconds_per_unit": per_unit,
        "estimated_seconds": None if per_unit is None else per_unit * units,
        "estimate_from": "not learned yet",
    }


def plan_table(summary: dict) -> str:
    width = max(len(row["layer"]) for row in summary["layers"] + [{"layer": "layer"}])
    lines = [
        f"{summary['model']} (weights {summary['digest']}), recipe {summary['recipe']} "
        f"({summary['steps']} steps, {summary['size']} px), K={summary['samples']}, "
        f"seed {summary['seed']}",
        f"{'layer':<{width}}  {'units':>6} {'tasks':>6} {'to do':>6} {'s/unit':>8} {'time':>8}",
    ]
    for row in summary["layers"]:
        per_unit = "-" if row["seconds_per_unit"] is None else f"{row['seconds_per_unit']:.2f}"
        up_to = "<=" if row.get("up_to") else ""
        lines.append(
            f"{row['layer']:<{width}}  {up_to + str(row['units']):>6} {row['tasks']:>6} "
            f"{up_to + str(row['todo']):>6} "
            f"{per_unit:>8} {format_duration(row['estimated_seconds']) if row['todo'] else '-':>8}"
        )
    sources = sorted({row["estimate_from"] for row in summary["layers"] if row["todo"]})
    estimated = format_duration(summary["estimated_seconds"])
    if summary["kept_from_before"]:
        lines.append(
            f"{summary['kept_from_before']} units stored before preprocessing was part of unit "
            "keys are kept, as made with the preprocessing of now (--force redoes them)"
        )
    up_to = "up to " if summary.get("up_to") else ""
    lines.append(
        f"{up_to}{summary['todo']} of {summary['units']} units to do in {summary['tasks']} tasks; "
        f"estimated {estimated} on one {summary['device']} worker"
        + (f" (from {', '.join(sources)})" if sources else "")
    )
    lines += [f"timing failed: {failure}" for failure in summary["calibration_failures"]]
    return "\n".join(lines)
