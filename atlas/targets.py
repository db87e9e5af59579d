"""Parsing unit names typed by users: `blocks.8:3`, `blocks.8:3@4,4`, `blocks.8:3@0-2,0-7`,
`blocks.8:3@centre`, `blocks.8` (the whole layer), `logits:8` or `logits:hen` (a class by label)."""

from __future__ import annotations

import re

from atlas.errors import AtlasError, did_you_mean
from atlas.layers import resolve
from atlas.optim.objectives import Target
from atlas.record import LOGITS

_POSITION = re.compile(r"^(\d+),(\d+)$")
_REGION = re.compile(r"^(\d+)-(\d+),(\d+)-(\d+)$")


def class_index(model, name: str) -> int:
    """The class whose label is `name` (case-insensitive), or an AtlasError with suggestions."""
    if not model.labels:
        raise AtlasError(f"{model.spec} has no class labels; give class numbers instead")
    lowered = [label.lower() for label in model.labels]
    if name.lower() in lowered:
        return lowered.index(name.lower())
    raise AtlasError(f"{model.spec} has no class {name!r}{did_you_mean(name, model.labels)}")


def parse_target(text: str, model, *, negative: bool = False) -> Target:
    """A Target from its command-line form, checked against the model's layers."""
    layer, colon, rest = text.partition(":")
    resolve(model, layer)
    if not colon:
        return Target(layer, "layer", negative=negative)
    unit, at, where = rest.partition("@")
    if unit.isdigit():
        index = int(unit)
    elif layer == LOGITS and unit:
        index = class_index(model, unit)
    else:
        raise AtlasError(f"{text!r}: expected LAYER:CHANNEL, e.g. blocks.8:3 or logits:hen")
    if layer == LOGITS and not at:
        return Target(layer, "logit", index, negative=negative)
    if not at:
        return Target(layer, "channel", index, negative=negative)
    if where == "centre":
        return Target(layer, "neuron", index, negative=negative)
    if match := _POSITION.match(where):
        position = (int(match[1]), int(match[2]))
        return Target(layer, "neuron", index, position=position, negative=negative)
    if match := _REGION.match(where):
        box = tuple(int(v) for v in match.groups())
        return Target(layer, "region", index, region=box, negative=negative)
    raise AtlasError(f"{text!r}: after @ give Y,X or centre (a neuron) or Y0-Y1,X0-X1 (a region)")
