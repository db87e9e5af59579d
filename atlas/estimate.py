"""How long a plan will take: seconds per unit per layer, from earlier runs in the same output
folder when there are any, else from a short calibration on this machine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from atlas.analysis import analyse
from atlas.optim import visualize
from atlas.optim.objectives import as_objective
from atlas.plan import Plan
from atlas.record import UnitRecord

CALIBRATION_STEPS = 6  # the first is a warm-up; the median of the other step times is used
CALIBRATION_BATCH = 4


@dataclass(frozen=True)
class LayerEstimate:
    layer: str
    seconds_per_unit: float | None
    source: str  # "earlier runs", "calibration", or "unknown"


def _from_records(records: list[UnitRecord], steps: int) -> float | None:
    rates = [r.seconds / r.steps for r in records if r.status == "done" and r.steps and r.seconds]
    return steps * sorted(rates)[len(rates) // 2] if rates else None


def _calibrate(model, plan: Plan, layer: str, device: str) -> float:
    """Seconds per unit: a few steps of a real batch (its K samples and variants), scaled to
    the recipe's steps, plus the analyses that follow them (atlas.analysis)."""
    units = [u for u in plan.units if u.layer == layer][:CALIBRATION_BATCH]
    samples = plan.config.samples
    targets = [t for unit in units for t in [unit.target()] * samples + unit.variant_targets()]
    recipe = plan.config.recipe.replace(steps=CALIBRATION_STEPS, octaves=())
    stamps: list[float] = []
    results = visualize(
        model, targets, recipe, device=device, on_step=lambda *_: stamps.append(time.perf_counter())
    )
    intervals = sorted(b - a for a, b in itertools.pairwise(stamps))
    per_step = intervals[len(intervals) // 2]  # robust to other load on shared machines
    main = [r for r in results if r.objective in {as_objective(u.target()) for u in units}]
    started = time.perf_counter()
    analyse(
        model,
        [r.target for r in main],
        [r.image for r in main],
        [r.start for r in main],
        samples,
        plan.inputs_from(layer),
    )
    analysis = time.perf_counter() - started
    return (per_step * plan.config.recipe.steps + analysis) / len(units)


def estimate(plan: Plan, model, records: list[UnitRecord], *, calibrate: bool, device: str = "cpu"):
    """One LayerEstimate per planned layer."""
    steps = plan.config.recipe.steps
    estimates = []
    for layer in plan.units_per_layer():
        earlier = _from_records([r for r in records if r.layer == layer], steps)
        if earlier is not None:
            estimates.append(LayerEstimate(layer, earlier, "earlier runs"))
        elif calibrate:
            estimates.append(
                LayerEstimate(layer, _calibrate(model, plan, layer, device), "calibration")
            )
        else:
            estimates.append(LayerEstimate(layer, None, "unknown"))
    return estimates
