"""Units as the site's pages show them: one UnitPage per unit, read from its UnitRecord, and
what each unit is for: the units that drive it (inputs), the units it drives (outputs), the
classes it pushes, where it fires, and how far to trust its picture.

Outputs are not stored: they are found at build time by inverting the `inputs` lists of the
next planned layer's units (u's outputs are the units v whose inputs list u, with v's weight).
Each unit keeps only its strongest inputs of each sign, so u's outputs are the units it is
among the strongest inputs of. Class labels come from plan.json (the model's labels), else
from the class logits in the atlas; a class without either is shown as "class k".

Records are read with UnitRecord.from_json, which checks every field's type, so that a damaged
one is caught before it is used. This module imports neither torch, nor Jinja2, nor Pillow
(atlas.site.writer renders the pages, atlas.site.linking links their files).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from atlas.record import LOGITS, LOW_TRUST, UnitRecord, learned_layer, split_layer
from atlas.site.timeline import CHANGE_SORT, CheckpointEntry, Frame, score

CURVE_WIDTH, CURVE_HEIGHT = 480, 160
SHOWN_UP, SHOWN_DOWN = 6, 3  # exciting and inhibiting inputs (and outputs) a page shows
PLANNED = ("layer", "index", "kind", "id", "label", "key", "direction")  # what a plan says


@dataclass(frozen=True)
class Link:
    """Another unit (an input or an output) or a class, as one unit's page shows it; paths are
    relative to that page."""

    name: str  # a channel number, a class label, or "class <k>"
    weight: float  # signed
    href: str | None = None  # None: not in the atlas
    thumb: str | None = None
    thumb_size: tuple[int, int] = (0, 0)
    alt: str = ""


@dataclass(frozen=True)
class Ranked:
    """Links of both signs: the strongest positive first, then the most negative."""

    up: tuple[Link, ...] = ()
    down: tuple[Link, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.up or self.down)


def ranked(pairs: Iterable[tuple], up: int, down: int, link: Callable[..., Link]) -> Ranked:
    """Of (what, weight) pairs, the `up` largest positive weights and the `down` most negative,
    strongest first, as link(what, weight). Ties keep the order given (a stable sort, so that
    a rerender is byte for byte the same); links are made for the pairs shown only."""
    pairs = list(pairs)
    positive = sorted((p for p in pairs if p[1] > 0), key=lambda p: -p[1])[:up]
    negative = sorted((p for p in pairs if p[1] < 0), key=lambda p: p[1])[:down]
    return Ranked(tuple(link(*p) for p in positive), tuple(link(*p) for p in negative))


@dataclass
class UnitPage:
    """One unit as the pages show it. `record` is the manifest's UnitRecord (for a unit whose
    files are damaged, the record as planned, marked missing)."""

    record: UnitRecord
    layer_dir: str
    images: list[str]  # relative to the layer folder
    thumb: str | None
    size: tuple[int, int] = (0, 0)  # of the images, for width and height attributes
    thumb_size: tuple[int, int] = (0, 0)
    timelapse: str | None = None  # the animated WebP of the optimization
    exemplars: list[dict] = field(default_factory=list)  # src, source, score
    maps: str | None = None  # the activation maps, starting image | best image
    maps_size: tuple[int, int] = (0, 0)
    variants: list[tuple[str, str]] = field(default_factory=list)  # (neuron|negative, src)
    filmstrip: list[Frame] = field(default_factory=list)  # across checkpoints, oldest first
    # set by connect(): the planned layers around this one, and what the unit is for
    before: str | None = None
    after: str | None = None
    inputs: Ranked = field(default_factory=Ranked)
    outputs: Ranked = field(default_factory=Ranked)
    outputs_measured: int = 0  # units of the next layer whose inputs are known
    classes: Ranked = field(default_factory=Ranked)
    trust_layers: list[tuple[str, float]] = field(default_factory=list)  # in plan order
    # a concept's or a cell's (UnitRecord.direction): its real layer's channels that weigh
    # most in it, and a cell's nearest concepts (weights: cosines)
    top_channels: tuple[Link, ...] = ()
    near_concepts: tuple[Link, ...] = ()

    @property
    def learned(self) -> dict | None:
        """A concept's or a cell's facts (UnitRecord.direction), None for any other unit."""
        return self.record.direction

    @property
    def name(self) -> str:
        """How grids caption it: its index, or a concept's or a cell's name ("concept3")."""
        return self.record.id.rpartition(":")[2] if self.learned else str(self.index)

    @property
    def share(self) -> float | None:
        """A concept's share of its layer's activations."""
        value = (self.learned or {}).get("share")
        return float(value) if isinstance(value, int | float) else None

    @property
    def count(self) -> int | None:
        """A cell's count of sampled activations."""
        value = (self.learned or {}).get("count")
        return value if type(value) is int else None

    @property
    def matched(self) -> float | None:
        """A concept's cosine to the concept of its index in the dictionary before."""
        value = (self.learned or {}).get("matched")
        return float(value) if isinstance(value, int | float) else None

    @property
    def activation_ratio(self) -> float | None:
        """The unit's activation on its visualization over that on its best exemplar."""
        activation = self.record.activation
        best = self.exemplars[0]["score"] if self.exemplars else None
        # a concept's exemplars score its coefficient, a cell's a cosine: no common scale
        if activation is None or best is None or best <= 0 or self.learned:
            return None
        return activation / best

    @property
    def index(self) -> int:
        return self.record.index

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def is_logit(self) -> bool:
        return self.record.layer == LOGITS

    @property
    def title(self) -> str:
        label = self.record.label
        return f"{self.record.id} ({label})" if label else self.record.id

    @property
    def alt(self) -> str:
        if self.learned:
            of = self.learned.get("of")
            return f"Feature visualization of {self.record.kind} {self.name} of {of}"
        kind = "class" if self.record.kind == "logit" else "channel"
        what = f"{kind} {self.index}"
        if self.record.label:
            what += f" ({self.record.label})"
        return f"Feature visualization of {self.record.layer} {what}"

    @property
    def page(self) -> str:
        return f"{self.index}.html"

    @property
    def curve(self) -> str:
        """Computed while the page renders, so that a bad history names its page."""
        return curve_points(self.record.history)

    @property
    def curve_range(self) -> tuple[float | None, float | None]:
        values = [point[1] for point in self.record.history]
        return (min(values), max(values)) if values else (None, None)

    @property
    def change(self) -> float | None:
        """Its change score since the previous checkpoint, as the grid sorts and shows it."""
        return score(self.record.change)

    @property
    def trust_score(self) -> float | None:
        score = (self.record.trust or {}).get("score")
        return float(score) if isinstance(score, int | float) else None

    @property
    def trust_agreement(self) -> float | None:
        value = (self.record.trust or {}).get("agreement")
        return float(value) if isinstance(value, int | float) else None

    @property
    def low_trust(self) -> bool:
        return self.trust_score is not None and self.trust_score < LOW_TRUST

    @property
    def trust_note(self) -> str:
        """The low-trust badge's title."""
        return (
            f"trust {self.trust_score:.2f}, under {LOW_TRUST}: this picture likely drives the "
            "unit another way than natural images do"
        )

    @property
    def measured_on(self) -> str:
        """What its inputs and class effects were measured on: the store puts those measured
        on its pictures and exemplars together in place of its pictures' alone, when it can."""
        trust = self.record.trust or {}
        together = isinstance(trust.get("inputs"), list) or isinstance(trust.get("classes"), list)
        return "its pictures and its dataset exemplars" if together else "its pictures"

    @property
    def pushes(self) -> str:
        """The labels of the classes it pushes up, for the grid's class filter."""
        return "|".join(link.name for link in self.classes.up)

    def files(self) -> list[str]:
        """The files of this unit that its page links (images, thumbnail, animation, maps,
        exemplar patches, filmstrip frames), relative to its layer folder."""
        extras = [self.thumb, self.timelapse, self.maps, *(e["src"] for e in self.exemplars)]
        extras += [e.get("map_src") for e in self.exemplars]
        extras += [src for _, src in self.variants]
        extras += [frame.src for frame in self.filmstrip]
        return [*self.images, *(name for name in extras if name)]


def curve_points(history, width: int = CURVE_WIDTH, height: int = CURVE_HEIGHT) -> str:
    """SVG polyline points for [[step, value], ...], scaled into the box."""
    if len(history) < 2:
        return ""
    steps = [point[0] for point in history]
    values = [point[1] for point in history]
    low, high = min(values), max(values)
    span_x = (steps[-1] - steps[0]) or 1
    span_y = (high - low) or 1
    return " ".join(
        f"{(s - steps[0]) / span_x * width:.1f},{height - (v - low) / span_y * height:.1f}"
        for s, v in zip(steps, values, strict=True)
    )


def connect(
    units_by_layer: dict[str, list[UnitPage]], planned: list[str], labels: Sequence[str] = ()
) -> None:
    """Set every unit page's neighbouring planned layers, inputs, outputs, classes and trust
    layers. `planned` is the plan's layer order (the class logits last); a layer not in it has
    no neighbours. `labels` are the model's class names (plan.json has them)."""
    pages = {(v.record.layer, v.index): v for units in units_by_layer.values() for v in units}
    logits = {v.index: v for v in units_by_layer.get(LOGITS, [])}
    real = [name for name in planned if split_layer(name)[1] is None]
    for layer, units in units_by_layer.items():
        of, part = split_layer(layer)
        position = real.index(of) if of in real and (part is None or layer in planned) else None
        before = real[position - 1] if position else None
        after = None  # a concept's outputs are not measured: the next layer's inputs are channels
        if position is not None and layer != LOGITS and position + 1 < len(real) and not part:
            after = real[position + 1]
        # the next layer's units that weigh this layer's channels, inverted: channel -> units
        driven: dict[int, list[tuple[UnitPage, float]]] = {}
        measured = 0
        for target in units_by_layer.get(after, []) if after else []:
            if target.record.inputs_from != layer or not target.record.inputs:
                continue
            measured += 1
            for channel, weight in target.record.inputs:
                driven.setdefault(channel, []).append((target, weight))
        for page in units:
            page.before, page.after, page.outputs_measured = before, after, measured
            source = page.record.inputs_from

            def input_link(channel: int, weight: float, source=source) -> Link:
                return unit_link(pages.get((source, channel)), channel, weight)

            page.inputs = ranked(page.record.inputs, SHOWN_UP, SHOWN_DOWN, input_link)
            page.outputs = ranked(
                driven.get(page.index, ()),
                SHOWN_UP,
                SHOWN_DOWN,
                lambda target, weight: unit_link(target, target.index, weight),
            )
            kept = len(page.record.classes)
            page.classes = ranked(
                page.record.classes,
                kept,
                kept,
                lambda k, e: class_link(logits.get(k), k, e, labels),
            )
            page.trust_layers = trust_layers(page.record.trust)
            if page.learned:
                learned_links(page, pages, of)


def learned_links(page: UnitPage, pages: dict, of: str) -> None:
    """A concept's or a cell's links: its top channels, by |weight| as atlas.concepts ranks
    them, and a cell's nearest concepts, each with its picture where the atlas has it."""

    def pairs(name: str) -> list[tuple[int, float]]:
        found = page.learned.get(name)
        found = found if isinstance(found, list) else []
        return [tuple(pair) for pair in found if isinstance(pair, list) and len(pair) == 2]

    page.top_channels = tuple(
        unit_link(pages.get((of, int(c))), int(c), float(w)) for c, w in pairs("channels")
    )
    concepts, near = learned_layer(of, "concepts"), []
    for k, cosine in pairs("concepts"):
        found = pages.get((concepts, int(k)))
        link = unit_link(found, int(k), float(cosine))
        near.append(dataclasses.replace(link, name=found.name if found else f"concept{int(k)}"))
    page.near_concepts = tuple(near)


def trust_layers(trust: dict | None) -> list[tuple[str, float]]:
    """(layer, naturalness) in the model's order, as atlas.trust stores them ([layer, value]
    pairs); an older record's object of layers is sorted by name, digits as numbers."""
    layers = (trust or {}).get("layers")
    if isinstance(layers, dict):
        pairs = sorted(layers.items(), key=lambda item: _name_order(item[0]))
    elif isinstance(layers, list):
        pairs = [tuple(pair) for pair in layers if isinstance(pair, list) and len(pair) == 2]
    else:
        return []
    return [(str(name), float(value)) for name, value in pairs if isinstance(value, int | float)]


def _name_order(name: str) -> tuple:
    return tuple((0, int(c), "") if c.isdigit() else (1, 0, c) for c in re.split(r"(\d+)", name))


def unit_link(page: UnitPage | None, index: int, weight: float) -> Link:
    """A link to another unit's page, with its thumbnail when it has one; the bare channel
    number when the unit is not in the atlas."""
    if page is None:
        return Link(str(index), weight)
    folder = f"../{page.layer_dir}/"
    return Link(
        page.record.label or (f"class {index}" if page.is_logit else str(index)),
        weight,
        folder + page.page,
        folder + page.thumb if page.thumb else None,
        page.thumb_size,
        page.alt,
    )


def class_link(
    page: UnitPage | None, index: int, effect: float, labels: Sequence[str] = ()
) -> Link:
    """A class: its label, linked to its logit's page (with its picture) when the logit is in
    the atlas; "class <k>" when no label is known."""
    known = labels[index] if 0 <= index < len(labels) else None
    if page is None:
        return Link(known or f"class {index}", effect)
    name = page.record.label or known or f"class {index}"
    return dataclasses.replace(unit_link(page, index, effect), name=name)


# --- reading the manifest's records ---


def parse_record(data: object) -> UnitRecord | None:
    """The unit record in a manifest entry, or None when it is none atlas can read (from_json
    checks every field's type)."""
    try:
        return UnitRecord.from_json(data)
    except ValueError:
        return None


def as_planned(record: UnitRecord) -> UnitRecord:
    """The record as the plan has it, marked missing: what it names and measured cleared."""
    return dataclasses.replace(
        record,
        status="missing",
        images=(),
        timelapse=None,
        variants={},
        exemplars=(),
        inputs_from=None,
        inputs=(),
        classes=(),
        maps=None,
        map_range=None,
        trust=None,
        change_from=None,
        change=None,
        filmstrip=(),
    )


def grid_order(
    units: Sequence[UnitPage], checkpoints: Sequence[CheckpointEntry]
) -> tuple[str, list[UnitPage]]:
    """The layer grid's default sort and its units in that order: most changed first when the
    atlas has a history and some unit a score (what changed last night), else by index. Units
    without a score go last; ties by index, as atlas.js sorts, so that the page without
    JavaScript is in the order its sort box names."""
    if not (checkpoints and any(unit.change is not None for unit in units)):
        return "index", list(units)
    return CHANGE_SORT, sorted(units, key=_most_changed_first)


def _most_changed_first(unit: UnitPage) -> tuple:
    return (unit.change is None, -(unit.change or 0.0), unit.index)
