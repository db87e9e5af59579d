"""The feature-visualization engine: objectives, parameterizations, transforms, recipes."""

from atlas.optim.objectives import (
    Diversity,
    Objective,
    Target,
    channel,
    diversity,
    logit,
    neuron,
    region,
    whole_layer,
)
from atlas.optim.recipes import PRESETS, Octave, Recipe, get
from atlas.optim.render import UnitResult, visualize

__all__ = [
    "PRESETS",
    "Diversity",
    "Objective",
    "Octave",
    "Recipe",
    "Target",
    "UnitResult",
    "channel",
    "diversity",
    "get",
    "logit",
    "neuron",
    "region",
    "visualize",
    "whole_layer",
]
