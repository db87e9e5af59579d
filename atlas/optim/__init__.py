"""The feature-visualization engine: objectives, parameterizations, transforms, recipes.

Names are imported on first use, so that `atlas.optim.recipes` (and the CLI's option
parsing) does not pay for importing torch."""

from atlas.lazy import lazy_names

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
    "contact_sheet": ["grid"],
}
__getattr__, __all__ = lazy_names("atlas.optim", _HOMES)
