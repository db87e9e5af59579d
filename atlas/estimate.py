"""How long a plan will take: seconds per unit per layer, from earlier runs in the same output
folder when there are any, else from a short calibration on this machine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from atlas.optim import visualize
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
    units = [u for u in plan.units if u.layer == layer][:CALIBRATION_BATCH]
    targets = [unit.target() for unit in units for _ in range(plan.config.samples)]
    recipe = plan.config.recipe.replace(steps=CALIBRATION_STEPS, octaves=())
    stamps: list[float] = []
    visualize(
        model, targets, recipe, device=device, on_step=lambda *_: stamps.append(time.perf_counter())
    )
    intervals = sorted(b - a for a, b in itertools.pairwise(stamps))
    per_step = intervals[len(intervals) // 2]  # robust to other load on shared machines
    steps = plan.config.recipe.steps
    return per_step * steps / len(units)


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
