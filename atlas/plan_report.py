"""`atlas plan`: what a run would do, per layer, with an estimated time."""

from __future__ import annotations

from atlas.errors import AtlasError
from atlas.estimate import estimate, unmeasured_layers
from atlas.execute import visible_gpus
from atlas.learning import Learning
from atlas.optimize import time_task
from atlas.plan import default_batch, load_and_plan, make_plan, make_tasks
from atlas.progress import format_duration
from atlas.record import split_layer
from atlas.rekey import made_before_keying
from atlas.store import Store

CALIBRATION_BATCH = 4  # units of a layer timed together


def plan_summary(config, *, calibrate: bool) -> dict:
    """Units, tasks, units still to do and estimated seconds per layer, as plain data."""
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
    device = "cuda" if visible_gpus() else "cpu"
    all_tasks = make_tasks(plan, list(plan.units), device)
    todo_tasks = make_tasks(plan, todo, device)
    records = store.records()
    timings = {}
    if calibrate and todo:
        for layer in unmeasured_layers(plan, records):
            units = [unit for unit in plan.units if unit.layer == layer][:CALIBRATION_BATCH]
            timings[layer] = time_task(model, make_tasks(plan, units, device)[0], device="cpu")
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
        "layers": layers,
    }


def _after(rows: list[dict], layer: str) -> int:
    """Where a row of `layer`'s concepts or atlas goes: after the rows of the layer."""
    return max(i for i, row in enumerate(rows) if split_layer(row["layer"])[0] == layer) + 1


def _unlearned(name: str, units: int, up_to: bool, plan, device: str, estimates) -> dict:
    """A row of concepts or cells not learned yet (atlas.learning): K of them, or up to N x N,
    each costing about what a channel of its real layer does."""
    real = split_layer(name)[0]
    per_unit = estimates[real].seconds_per_unit if real in estimates else None
    size = plan.config.batch or default_batch(
        next(i for i in plan.layers if i.name == real), device
    )
    tasks = -(-units // size)
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
    return "\n".join(lines)
