"""Objectives: what an optimized image should excite, as small values that compose.

A `Target` names one unit (a channel, a neuron, a region, a whole layer, a class logit). An
`Objective` is a weighted sum of terms (targets and diversity terms); targets and objectives
combine with `+`, `-`, unary `-` and scalar `*`. Each image in a batch has its own objective;
`BatchObjective` evaluates all of them at once from the captured activations, grouping the
terms so that a batch of 256 channels costs a handful of tensor ops, not 256.
"""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from atlas.record import LOGITS


class _Composable:
    """Arithmetic shared by targets, diversity terms and objectives."""

    def __add__(self, other: object) -> Objective:
        return as_objective(self)._combine(other, 1.0)

    __radd__ = __add__  # so that sum(objectives) works

    def __sub__(self, other: object) -> Objective:
        return as_objective(self)._combine(other, -1.0)

    def __mul__(self, factor: float) -> Objective:
        if not isinstance(factor, int | float):
            return NotImplemented
        return Objective(tuple((w * factor, t) for w, t in as_objective(self).terms))

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return self * -1.0


@dataclass(frozen=True, repr=False)
class Direction:
    """A named direction over a layer's channels (a concept, an activation-atlas cell) and the
    power of the cosine similarity that its objective multiplies the dot product by. Its repr
    names it by digest, so that seeds and keys derived from a target stay short and stable."""

    name: str
    values: tuple[float, ...]
    power: float = 2.0

    @property
    def digest(self) -> str:
        """sha256 of the weights (as float32) and the power: what a unit key needs of it."""
        packed = struct.pack(f"<{len(self.values)}f", *self.values) + struct.pack("<d", self.power)
        return hashlib.sha256(packed).hexdigest()

    def __repr__(self) -> str:
        return f"Direction({self.name!r}, {self.digest[:16]}, power={self.power:g})"


@dataclass(frozen=True)
class Target(_Composable):
    """One unit of a network. `position` is (y, x); `region` is (y0, y1, x0, x1), half-open;
    `direction` the weights over channels that a `direction` target reads."""

    layer: str
    kind: str = "channel"
    index: int | None = None
    position: tuple[int, int] | None = None
    region: tuple[int, int, int, int] | None = None
    negative: bool = False
    direction: Direction | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}; expected one of {tuple(KINDS)}")
        for needed in KINDS[self.kind].needs:
            if getattr(self, needed) is None:
                raise ValueError(f"a {self.kind} target needs {NEEDS[needed]}")

    def box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """The (y0, y1, x0, x1) positions this target averages, or None for all of them."""
        box = KINDS[self.kind].box
        return box(self, height, width) if box else None

    @property
    def id(self) -> str:
        """Stable name: 'blocks.8:3', 'logits:285', 'blocks.8:3@4,4', 'blocks.8:3@centre',
        '-blocks.8' (negated)."""
        text = self.layer if self.index is None else f"{self.layer}:{self.index}"
        text += KINDS[self.kind].suffix(self)
        return f"-{text}" if self.negative else text


@dataclass(frozen=True)
class Diversity(_Composable):
    """Minus the mean cosine similarity of this image's Gram matrix at `layer` to those of the
    other images in the batch that share its objective: maximizing it makes K images of one unit
    differ in style rather than only in position."""

    layer: str


Term = Target | Diversity


@dataclass(frozen=True)
class Objective(_Composable):
    """A weighted sum of terms, maximized by `visualize`."""

    terms: tuple[tuple[float, Term], ...]

    def _combine(self, other: object, sign: float) -> Objective:
        if isinstance(other, int | float) and other == 0:
            return self
        other_terms = as_objective(other).terms
        return Objective(self.terms + tuple((sign * w, t) for w, t in other_terms))

    @property
    def layers(self) -> set[str]:
        return {term.layer for _, term in self.terms}

    @property
    def id(self) -> str:
        """The target's id for a single-target objective, else a readable formula."""
        if len(self.terms) == 1 and self.terms[0][0] == 1.0:
            return self.terms[0][1].id if isinstance(self.terms[0][1], Target) else repr(self)
        parts = []
        for w, term in self.terms:
            name = term.id if isinstance(term, Target) else f"diversity({term.layer})"
            parts.append(f"{w:+g}*{name}")
        return " ".join(parts)

    @property
    def main_target(self) -> Target | None:
        """The first target term, which names the image in results and file names."""
        return next((t for _, t in self.terms if isinstance(t, Target)), None)


def as_objective(value: object) -> Objective:
    if isinstance(value, Objective):
        return value
    if isinstance(value, Target | Diversity):
        return Objective(((1.0, value),))
    raise TypeError(f"cannot use {value!r} as an objective")


def channel(layer: str, index: int, *, negative: bool = False) -> Target:
    """Mean activation of one channel over all positions."""
    return Target(layer, "channel", index, negative=negative)


def neuron(
    layer: str, index: int, position: tuple[int, int] | None = None, *, negative: bool = False
) -> Target:
    """Activation of one channel at one position (the centre of the map by default)."""
    return Target(layer, "neuron", index, position=position, negative=negative)


def region(
    layer: str, index: int, box: tuple[int, int, int, int], *, negative: bool = False
) -> Target:
    """Mean activation of one channel over the positions y0 <= y < y1, x0 <= x < x1."""
    return Target(layer, "region", index, region=box, negative=negative)


def whole_layer(layer: str, *, negative: bool = False) -> Target:
    """Mean square activation of a whole layer (DeepDream): amplifies whatever it sees."""
    return Target(layer, "layer", negative=negative)


def logit(index: int, *, negative: bool = False) -> Target:
    """Pre-softmax output of one class: softmax can rise by suppressing the other classes."""
    return Target(LOGITS, "logit", index, negative=negative)


def direction(
    layer: str,
    name: str,
    values: Sequence[float],
    *,
    power: float = 2.0,
    position: tuple[int, int] | None = None,
    negative: bool = False,
) -> Target:
    """How far the layer's activation points along `values`, as a dot product times the cosine
    similarity to the power `power` (Lucid's atlas notebooks, Horama's dot_cossim), averaged
    over all positions, or at `position`; its id is `<layer>:<name>`, e.g. 'blocks.8:concept3'.
    """
    weights = Direction(name, tuple(float(v) for v in values), float(power))
    return Target(layer, "direction", position=position, negative=negative, direction=weights)


def unit_target(layer: str, index: int) -> Target:
    """The target an atlas unit maximizes: a class logit, or a channel of its layer."""
    return logit(index) if layer == LOGITS else channel(layer, index)


def diversity(layer: str) -> Diversity:
    return Diversity(layer)


def _gram_cosines(acts: torch.Tensor) -> torch.Tensor:
    """[K, C, H, W] (or [K, C]) activations -> [K, K] cosine similarities of Gram matrices."""
    flat = acts.float().flatten(2) if acts.dim() > 2 else acts.float().unsqueeze(-1)
    gram = flat @ flat.transpose(1, 2) / flat.shape[-1]
    gram = torch.nn.functional.normalize(gram.flatten(1), dim=1)
    return gram @ gram.T


# --- objective kinds: how a target reads its layer ------------------------------------------


class TermGroup:
    """The targets of one kind on one layer across a batch: their image rows, channel
    indices and signed weights, as tensors built once per device and cached."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.indices: list[int] = []
        self.weights: list[float] = []
        self.targets: list[Target] = []
        self._cache: dict[tuple, torch.Tensor] = {}

    def add(self, row: int, target: Target, weight: float) -> None:
        self.rows.append(row)
        self.indices.append(target.index if target.index is not None else 0)
        self.weights.append(weight)
        self.targets.append(target)

    def tensor(self, name: str, device: torch.device) -> torch.Tensor:
        if (name, device) not in self._cache:
            values = getattr(self, name)
            dtype = torch.float32 if name == "weights" else torch.long
            self._cache[(name, device)] = torch.tensor(values, dtype=dtype, device=device)
        return self._cache[(name, device)]

    def channel(self, acts: torch.Tensor) -> torch.Tensor:
        """Each target's own channel: [n, H, W] on a map, [n] on a [B, C] layer."""
        rows, indices = self.tensor("rows", acts.device), self.tensor("indices", acts.device)
        return acts[rows, indices].float()

    def directions(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, C] unit-norm weights of each target's direction, and [n] their cosine powers."""
        if ("directions", device) not in self._cache:
            values = [target.direction.values for target in self.targets]
            weights = torch.tensor(values, dtype=torch.float32, device=device)
            powers = [target.direction.power for target in self.targets]
            self._cache[("directions", device)] = torch.nn.functional.normalize(weights, dim=1)
            self._cache[("powers", device)] = torch.tensor(powers, device=device)
        return self._cache[("directions", device)], self._cache[("powers", device)]

    def masks(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[n, H, W] averaging masks over each target's box."""
        if ("masks", height, width, device) not in self._cache:
            masks = torch.zeros(len(self.targets), height, width, device=device)
            for i, target in enumerate(self.targets):
                y0, y1, x0, x1 = target.box(height, width)
                masks[i, y0:y1, x0:x1] = 1.0 / max((y1 - y0) * (x1 - x0), 1)
            self._cache[("masks", height, width, device)] = masks
        return self._cache[("masks", height, width, device)]


@dataclass(frozen=True)
class ObjectiveKind:
    """One kind of target. `value(acts, group)` maps a layer's activations [B, C, H, W] (or
    [B, C]) to one value per target of the group; `needs` are the Target fields it must have;
    `box` gives the positions it averages (None: all); `suffix` is what it adds to the id."""

    value: Callable[[torch.Tensor, TermGroup], torch.Tensor]
    needs: tuple[str, ...] = ("index",)
    box: Callable[[Target, int, int], tuple[int, int, int, int]] | None = None
    suffix: Callable[[Target], str] = lambda target: ""


KINDS: dict[str, ObjectiveKind] = {}
NEEDS = {
    "index": "a channel or class index",
    "region": "region=(y0, y1, x0, x1)",
    "direction": "direction=Direction(name, weights)",
}


def objective_kind(name: str, **options) -> Callable:
    """Register a kind of target: a new kind is one decorated function (see ObjectiveKind)."""

    def register(value: Callable[[torch.Tensor, TermGroup], torch.Tensor]) -> Callable:
        KINDS[name] = ObjectiveKind(value, **options)
        return value

    return register


@objective_kind("channel")
@objective_kind("logit")
def mean_of_channel(acts: torch.Tensor, group: TermGroup) -> torch.Tensor:
    """A channel's mean over all positions; on a [B, C] layer (logits, pooled features) the
    value itself."""
    picked = group.channel(acts)
    return picked if picked.dim() == 1 else picked.flatten(1).mean(1)


def _box_mean(acts: torch.Tensor, group: TermGroup) -> torch.Tensor:
    picked = group.channel(acts)
    if picked.dim() == 1:
        return picked
    return (picked * group.masks(*picked.shape[-2:], acts.device)).flatten(1).sum(1)


def _centre_or_position(target: Target, height: int, width: int) -> tuple[int, int, int, int]:
    y, x = target.position or (height // 2, width // 2)
    return (y, y + 1, x, x + 1)


objective_kind(
    "neuron",
    box=_centre_or_position,
    suffix=lambda t: "@{},{}".format(*t.position) if t.position else "@centre",
)(_box_mean)
objective_kind(
    "region",
    needs=("index", "region"),
    box=lambda target, height, width: target.region,
    suffix=lambda t: "@{}-{},{}-{}".format(*t.region),
)(_box_mean)


COSINE_FLOOR = 0.1  # as Lucid and Horama: an image pointing away still gets a gradient


def _all_or_position(target: Target, height: int, width: int) -> tuple[int, int, int, int]:
    return _centre_or_position(target, height, width) if target.position else (0, height, 0, width)


@objective_kind(
    "direction",
    needs=("direction",),
    box=_all_or_position,
    suffix=lambda t: f":{t.direction.name}" + ("@{},{}".format(*t.position) if t.position else ""),
)
def direction_dot_cosine(acts: torch.Tensor, group: TermGroup) -> torch.Tensor:
    """Per position, the activation's dot product with the unit-norm direction times its
    cosine similarity (floored at COSINE_FLOOR) to the direction's power; averaged over the
    target's positions. With power 0 a plain dot product, which a few loud channels can
    dominate; a higher power rewards pointing along the direction (bench/concepts.py)."""
    picked = acts[group.tensor("rows", acts.device)].float()
    value = direction_values(picked, *group.directions(acts.device))
    if value.dim() == 1:
        return value
    return (value * group.masks(*value.shape[-2:], acts.device)).flatten(1).sum(1)


def direction_values(
    acts: torch.Tensor, weights: torch.Tensor, powers: torch.Tensor
) -> torch.Tensor:
    """The direction objective at every position: [n, C, H, W] (or [n, C]) activations, [n, C]
    unit-norm weights and [n] cosine powers -> [n, H, W] (or [n]). What a direction's map on
    an image shows (atlas.analysis), as the objective reads it."""
    shape = (-1, weights.shape[1]) + (1,) * (acts.dim() - 2)
    dot = (acts * weights.view(shape)).sum(1)
    cosine = dot / acts.norm(dim=1).clamp_min(1e-6)
    powers = powers.view((-1,) + (1,) * (dot.dim() - 1))
    return dot * cosine.clamp_min(COSINE_FLOOR).pow(powers)


@objective_kind("layer", needs=())
def mean_square_of_layer(acts: torch.Tensor, group: TermGroup) -> torch.Tensor:
    """The whole layer's mean square (DeepDream): every channel, every position."""
    return acts[group.tensor("rows", acts.device)].float().flatten(1).square().mean(1)


class BatchObjective:
    """Evaluates one objective per image, vectorized over images that share a term kind."""

    def __init__(self, objectives: Sequence[Objective]):
        self.size = len(objectives)
        self._groups: dict[tuple[str, str], TermGroup] = defaultdict(TermGroup)
        # (layer, weight) -> lists of rows sharing an objective (diversity groups)
        self._diversity: dict[tuple[str, float], list[list[int]]] = defaultdict(list)
        rows_by_objective: dict[Objective, list[int]] = defaultdict(list)
        for row, objective in enumerate(objectives):
            rows_by_objective[objective].append(row)
        for objective, rows in rows_by_objective.items():
            for weight, term in objective.terms:
                if isinstance(term, Diversity):
                    if len(rows) > 1:
                        self._diversity[(term.layer, weight)].append(rows)
                    continue
                sign = -weight if term.negative else weight
                for row in rows:
                    self._groups[(term.layer, term.kind)].add(row, term, sign)

    def __call__(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-image objective values, shape [B], float32."""
        device = next(iter(acts.values())).device
        values = torch.zeros(self.size, device=device)
        for (layer, kind), group in self._groups.items():
            unit = KINDS[kind].value(acts[layer], group)
            weights = group.tensor("weights", device)
            values = values.index_add(0, group.tensor("rows", device), weights * unit)
        for (layer, weight), groups in self._diversity.items():
            for rows in groups:
                cos = _gram_cosines(acts[layer][rows])
                k = len(rows)
                similarity = (cos.sum(1) - cos.diagonal()) / (k - 1)
                index = torch.tensor(rows, device=device)
                values = values.index_add(0, index, -weight * similarity)
        return values
