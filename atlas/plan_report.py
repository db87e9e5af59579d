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
from atlas.optimize import calibration_task
from atlas.plan import Plan, load_and_plan, make_tasks
from atlas.progress import Progress, format_duration
from atlas.rekey import made_before_keying
from atlas.store import Store

WHAT = "layer shapes"  # what the progress line counts


def shape_groups(plan: Plan, layers: list[str]) -> dict[str, list[str]]:
    """The layer to time for each distinct output shape among `layers`, with the layers its
    figure stands for: the middle one, whose depth is their mean when they follow each other
    (a deeper layer costs more: its forward and backward passes are longer)."""
    info = {layer.name: layer for layer in plan.layers}
    groups: dict[tuple, list[str]] = {}
    for name in layers:
        groups.setdefault((info[name].kind, tuple(info[name].shape)), []).append(name)
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
        "units": len(plan.units),
        "todo": len(todo),
        "kept_from_before": len(kept),
        "tasks": len(todo_tasks),
        "estimated_seconds": None if None in known else sum(known),
        "calibration_failures": failures,
        "layers": layers,
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
        lines.append(
            f"{row['layer']:<{width}}  {row['units']:>6} {row['tasks']:>6} {row['todo']:>6} "
            f"{per_unit:>8} {format_duration(row['estimated_seconds']) if row['todo'] else '-':>8}"
        )
    sources = sorted({row["estimate_from"] for row in summary["layers"] if row["todo"]})
    estimated = format_duration(summary["estimated_seconds"])
    if summary["kept_from_before"]:
        lines.append(
            f"{summary['kept_from_before']} units stored before preprocessing was part of unit "
            "keys are kept, as made with the preprocessing of now (--force redoes them)"
        )
    lines.append(
        f"{summary['todo']} of {summary['units']} units to do in {summary['tasks']} tasks; "
        f"estimated {estimated} on one {summary['device']} worker"
        + (f" (from {', '.join(sources)})" if sources else "")
    )
    lines += [f"timing failed: {failure}" for failure in summary["calibration_failures"]]
    return "\n".join(lines)
