"""The feature-visualization engine: objectives, parameterizations, transforms, recipes.

Names are imported on first use, so that `atlas.optim.recipes` (and the CLI's option
parsing) does not pay for importing torch."""

from importlib import import_module

_HOMES = {
    "objectives": [
        "Direction",
        "Diversity",
        "Objective",
        "Target",
        "channel",
        "direction",
        "diversity",
        "logit",
        "neuron",
        "region",
        "whole_layer",
    ],
    "recipes": ["PRESETS", "Octave", "Recipe", "get"],
    "loop": ["UnitResult", "visualize"],
    "sheet": ["grid"],
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'atlas.optim' has no attribute {name!r}")
    return getattr(import_module(f"atlas.optim.{_WHERE[name]}"), name)
