"""How long a plan will take: seconds per unit per layer, from earlier runs in the same output
folder when there are any, else from timings of a few steps (atlas.optimize.time_task), else
unknown. Pure arithmetic: whoever wants timings computes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from atlas.plan import Plan
from atlas.record import UnitRecord, split_layer


@dataclass(frozen=True)
class LayerEstimate:
    layer: str
    seconds_per_unit: float | None
    source: str  # "earlier runs", "calibration", or "unknown"


def from_records(records: list[UnitRecord], steps: int) -> float | None:
    """Seconds per unit at `steps`: the median rate per step of the done records."""
    rates = [r.seconds / r.steps for r in records if r.status == "done" and r.steps and r.seconds]
    return steps * sorted(rates)[len(rates) // 2] if rates else None


def unmeasured_layers(plan: Plan, records: list[UnitRecord]) -> list[str]:
    """The planned layers that no earlier run in OUT has timings of."""
    return [
        layer
        for layer in plan.units_per_layer()
        if from_records([r for r in records if r.layer == layer], layer_steps(plan, layer)) is None
    ]


def layer_steps(plan: Plan, layer: str) -> int:
    """The steps a layer's units run: a learned layer's may be --concept-steps."""
    return plan.config.recipe_for(split_layer(layer)[0] != layer).steps


def estimate(
    plan: Plan, records: list[UnitRecord], timings: Mapping[str, float] | None = None
) -> list[LayerEstimate]:
    """One LayerEstimate per planned layer: from earlier runs, else from `timings` (seconds
    per unit by layer, measured by a calibration), else unknown."""
    timings = timings or {}
    estimates = []
    for layer in plan.units_per_layer():
        steps = layer_steps(plan, layer)
        earlier = from_records([r for r in records if r.layer == layer], steps)
        if earlier is not None:
            estimates.append(LayerEstimate(layer, earlier, "earlier runs"))
        elif layer in timings:
            estimates.append(LayerEstimate(layer, timings[layer], "calibration"))
        else:
            estimates.append(LayerEstimate(layer, None, "unknown"))
    return estimates
