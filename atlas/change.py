"""How much a unit changed between two pictures of it: the score `atlas compare` and the
nightly history (atlas.history) share.

A unit's cross ratio asks how well the other side's picture drives the unit, against the
unit's own picture, both from its response to a plain grey image (so that units whose
activations are negative, before a ReLU, score too):

    cross  = (unit on the other picture - on grey) / (unit on its own picture - on grey)
    change = 1 - mean over the sides measured of clip(cross, 0, 1)

0: the other picture excites the unit as much as its own; 1: no more than grey does. A side
whose own picture does not beat grey has no cross ratio. `atlas compare` measures both sides
(each model on both pictures); a nightly run holds only the new weights, so its score is the
new side's: how well last checkpoint's picture drives the unit now.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def cross(value: float, own: float, grey: float) -> float:
    """One side's cross ratio in [0, 1], NaN where its own picture does not beat grey."""
    gain = own - grey
    if not gain > 0 or not math.isfinite(value):
        return math.nan
    return min(max((value - grey) / gain, 0.0), 1.0)


def change(crosses: Sequence[float]) -> float:
    """The change score of the sides' cross ratios that were measured (NaN: none was)."""
    known = [c for c in crosses if not math.isnan(c)]
    return 1 - sum(known) / len(known) if known else math.nan


def against_previous(
    model, targets: Sequence, images: Sequence[np.ndarray], previous: Sequence[np.ndarray]
) -> list[float]:
    """Each target's change from `previous[i]` (last checkpoint's picture) to `images[i]`
    (its picture now), measured by `model` (the new weights) alone: one side of the score."""
    from atlas.activations import activation_grid, clean_activations

    if not targets:
        return []
    grey = np.full_like(images[0], 128)
    on_grey = activation_grid(model, targets, [grey])[0].tolist()
    own = clean_activations(model, targets, images)
    then = clean_activations(model, targets, previous)
    return [change([cross(*v)]) for v in zip(then, own, on_grey, strict=True)]
