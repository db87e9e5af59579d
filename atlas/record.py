"""The typed records every stage reads and writes, their fields spelled here and nowhere else.

UnitRecord, one unit's result: workers and `atlas visualize` write it, the store keeps it as
OUT/units/<layer>/<index>.json, and the manifest, site, compare and the test fixtures read it
back. RunRecord, one run's facts beside its units: `atlas run` writes it as plan.json (with the
planned units), `atlas visualize` as results.json (with the unit records), the manifest carries
its fields, and the site, the history and compare read it. Reading is tolerant: unknown keys (a
newer atlas, a user's note) are ignored and missing ones take their defaults, so files written
by earlier versions stay readable. This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field

import numpy as np

LOGITS = "logits"  # the layer name of a model's output: listed, planned and stored as a layer
HISTORY_POINTS = 128  # objective curve points kept per unit
LOW_TRUST = 0.2  # a unit whose trust score (atlas.trust) is below it is flagged on the site
STATUSES = ("done", "failed", "missing", "stale")  # what the store adds on reading
PAIRS = ("history", "inputs", "classes")  # fields of (number, number) pairs
ATTACHED = ("exemplars", "filmstrip")  # what the store attaches on reading: lists of dicts
VARIANT_FILE = "variant:"  # a `files` name for the store: "variant:neuron" -> <index>.neuron.webp
# a real layer's concepts and activation-atlas cells are the units of a layer of their own,
# "<layer>~concepts" and "<layer>~atlas" (atlas.learning), whose unit kinds these are
LEARNED_KINDS = {"concepts": "concept", "atlas": "cell"}
MATCHED = 0.5  # a concept matched to the one before it (atlas.learning) under this cosine is
# another concept: its filmstrip is marked and it gets no change score


def learned_layer(layer: str, part: str) -> str:
    """The layer that holds the concepts ("blocks.8~concepts") or the activation-atlas cells
    ("blocks.8~atlas") of a real layer: every place keyed by (layer, index) keeps working."""
    return f"{layer}~{part}"


def split_layer(name: str) -> tuple[str, str | None]:
    """(the real layer, "concepts" or "atlas") of a learned layer; (name, None) of any other
    ("~" is no character of a module path)."""
    real, tilde, part = name.rpartition("~")
    return (real, part) if tilde and part in LEARNED_KINDS else (name, None)


def downsample(history: list[float], points: int = HISTORY_POINTS) -> list[list[float]]:
    """[[step, value], ...] at most `points` long, always keeping the first and last step."""
    if not history:
        return []
    steps = np.unique(np.linspace(0, len(history) - 1, min(points, len(history))).round())
    return [[int(step), round(float(history[int(step)]), 5)] for step in steps]


def optimization_facts(result) -> dict:
    """The UnitRecord fields of how an optimization went, from its first image's result (an
    atlas.optim UnitResult): objective values, best step, clean activation, the curve."""
    return {
        "steps": len(result.history),
        "objective_start": result.objective_start,
        "objective_final": result.objective_final,
        "objective_best": result.objective_best,
        "best_step": result.best_step,
        "activation": result.activation,
        "history": tuple(map(tuple, downsample(result.history))),
    }


@dataclass(frozen=True)
class UnitRecord:
    """One unit: what it is, how it was made, how the optimization went, and its files
    (paths relative to OUT, or to results.json's folder for `atlas visualize`)."""

    layer: str
    index: int | None  # None for a whole-layer objective (`atlas visualize blocks.8`)
    kind: str = "channel"  # channel | logit | neuron | region | layer | concept | cell
    id: str = ""  # the target's id ('blocks.8:3', 'logits:285', 'blocks.8:3@centre')
    label: str | None = None  # the class name of a logit
    key: str | None = None  # the plan's content key; None outside `atlas run`
    status: str = "done"  # done | failed as stored; missing | stale as the store reads it
    error: str | None = None  # why a failed unit failed
    recipe: str | None = None
    recipe_hash: str | None = None
    seed: int = 0  # the run's seed; each image's own seed is in image_seeds
    samples: int = 1  # K images of the unit
    image_seeds: tuple[int, ...] = ()
    images: tuple[str, ...] = ()
    timelapse: str | None = None  # the first image's optimization as an animated WebP
    frames_every: int | None = None  # the timelapse keeps a frame every N steps
    steps: int | None = None
    seconds: float | None = None  # this unit's share of its task's time
    device: str | None = None  # 'cuda:<name>' or 'cpu:<N> threads'
    objective_start: float | None = None
    objective_final: float | None = None
    objective_best: float | None = None
    best_step: int | None = None
    activation: float | None = None  # the objective on the stored image, no transforms
    history: tuple[tuple[int, float], ...] = ()  # (step, objective), at most HISTORY_POINTS
    # what the unit is for (atlas.analysis), measured on its images
    inputs_from: str | None = None  # the planned layer its inputs are channels of
    inputs: tuple[tuple[int, float], ...] = ()  # (channel, weight): excite first, then inhibit
    classes: tuple[tuple[int, float], ...] = ()  # (class, effect): pushed up, then down
    maps: str | None = None  # its map on the starting and the best image, side by side
    map_range: tuple[float, float] | None = None  # the maps' shared colour scale
    variants: dict[str, str] = field(default_factory=dict)  # "neuron"/"negative" -> its image
    # against the previous checkpoint of OUT (atlas.history): its id, and atlas.change's score
    change_from: str | None = None
    change: float | None = None
    checkpoint: str | None = None  # the id of the checkpoint whose weights made it (atlas run)
    # a concept's or an activation-atlas cell's facts (atlas.learning): "of" (the real layer
    # it is a direction over), "channels" ([channel, weight] of the largest weights), then a
    # concept's "share" (of the layer's activations it explains) and "matched" (its cosine to
    # the concept of its index in the dictionary before, or None), or a cell's "row", "col",
    # "count" (of sampled activations in it) and "concepts" ([index, cosine], nearest first)
    direction: dict | None = None
    # attached by the store when it reads OUT (from OUT/exemplars), never written with the unit
    exemplars: tuple[dict, ...] = field(default=(), compare=False)
    trust: dict | None = field(default=None, compare=False)  # atlas.trust: score, layers
    # attached by the store from OUT/checkpoints, oldest first, this record's image last:
    # {"checkpoint": id, "image": path, "change": score or None}
    filmstrip: tuple[dict, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            default = self.layer if self.index is None else f"{self.layer}:{self.index}"
            object.__setattr__(self, "id", default)

    @property
    def files(self) -> list[str]:
        """Every file the record names: its images, its animation and its maps."""
        extras = [self.timelapse, self.maps, *self.variants.values()]
        return [*self.images, *(name for name in extras if name)]

    def as_json(self) -> dict:
        """The record as JSON data; exemplars only when attached."""
        # the attached lists of dicts are JSON already: asdict's deep copy of them would
        # cost more than the rest of the record (30 frames of a nightly atlas)
        attached = {name: getattr(self, name) for name in ATTACHED}
        data = dataclasses.asdict(dataclasses.replace(self, **dict.fromkeys(ATTACHED, ())))
        data.update(attached)
        for name in PAIRS:
            data[name] = [list(pair) for pair in data[name]]
        if self.map_range is not None:
            data["map_range"] = list(self.map_range)
        for name in ("image_seeds", "images", "exemplars", "filmstrip"):
            data[name] = list(data[name])
        for name in ("exemplars", "trust", "filmstrip"):
            if not data[name]:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: object) -> UnitRecord | None:
        """The record in a unit JSON, or None when `data` is no unit record (a dict with a
        string layer and an integer index, or a whole layer's record). A unit record whose
        fields are damaged raises ValueError naming the field."""
        if not (
            isinstance(data, dict)
            and isinstance(data.get("layer"), str)
            and (type(data.get("index")) is int or _whole_layer(data))
        ):
            return None
        try:
            return cls._parse(data)
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None

    @classmethod
    def _parse(cls, data: dict) -> UnitRecord:
        known = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        files = [*known.get("images", []), known.get("timelapse"), known.get("maps")]
        files += list(dict(known.get("variants") or {}).values())
        if not all(name is None or isinstance(name, str) for name in files):
            raise ValueError("a file name that is not a string")
        for name in ("image_seeds", "images", "exemplars", "filmstrip"):
            if isinstance(known.get(name), list):
                known[name] = tuple(known[name])
        if isinstance(known.get("timelapse"), list):  # one animation per image, as visualize has
            known["timelapse"] = known["timelapse"][0] if known["timelapse"] else None
        history = known.get("history")
        if isinstance(history, list):
            known["history"] = tuple(_point(p, step) for step, p in enumerate(history))
        for name in ("inputs", "classes"):
            if isinstance(known.get(name), list):
                known[name] = _pairs(known[name])
        if isinstance(known.get("map_range"), list):
            known["map_range"] = tuple(known["map_range"])
        if known.get("status", "done") not in STATUSES:
            raise ValueError(f"status {known['status']!r} is none of {', '.join(STATUSES)}")
        for name, value in known.items():
            if not _fits(value, _field_types()[name]):
                raise ValueError(f"field {name!r} holds {type(value).__name__} {value!r:.40}")
        return cls(**known)

    def with_status(self, status: str, exemplars: dict | None = None) -> UnitRecord:
        """This record as the store reads it: stale or missing, with its exemplar record's
        patches attached, and its trust score when it was computed for this record's key (with
        the inputs and class effects measured on its pictures and exemplars together, which
        then replace those of its pictures alone)."""
        changes: dict = {"status": status}
        if exemplars is not None:
            changes["exemplars"] = tuple(exemplars["items"])
            trust = exemplars.get("trust")
            ours = isinstance(trust, dict) and trust.get("unit_key") == self.key
            if ours and self.images:  # the trust of a picture: none for a unit without one
                changes["trust"] = trust
                for name in ("inputs", "classes"):
                    if isinstance(trust.get(name), list):
                        changes[name] = _pairs(trust[name])
        return dataclasses.replace(self, **changes)


@functools.cache
def _field_types() -> dict[str, object]:
    return typing.get_type_hints(UnitRecord)


def _fits(value: object, hint: object) -> bool:
    """Whether a parsed JSON value has the type a field's annotation names (the simple types
    a record holds: str, int, float, bool, None, unions, tuples, dicts)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return type(value) is int
    if hint in (str, bool, dict):
        return type(value) is hint
    if origin is dict:
        return isinstance(value, dict) and all(
            _fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items()
        )
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(_fits, value, args))
    return True


def _whole_layer(data: dict) -> bool:
    """A layer's whole-layer image: kind "layer", no index."""
    return data.get("kind") == "layer" and data.get("index") is None


def _pairs(listed: list) -> tuple[tuple[int, float], ...]:
    """(index, weight) pairs from their JSON lists."""
    return tuple((int(index), float(weight)) for index, weight in listed)


def _point(point: object, step: int) -> tuple[int, float]:
    """A history point: [step, value] as stored, or a bare value (older results.json)."""
    if isinstance(point, list | tuple) and len(point) == 2:
        return (int(point[0]), float(point[1]))
    return (step, float(point))


@dataclass(frozen=True)
class RunRecord:
    """What one run did beside its units: which model (spec, weights digest, the weights asked
    for, its preprocessing), which recipe, K and seed, when, where and with which versions;
    for `atlas run` also its layers, the model's class labels and its checkpoint."""

    spec: str = "unknown model"
    digest: str = "?"  # of the weights
    weights: str | None = None  # as given: a file, a name, "random"; None: the model's own
    preprocessing: dict | None = None  # as LoadedModel.preprocessing_facts() says it
    recipe: str = "?"
    recipe_hash: str = "?"
    recipe_settings: dict = field(default_factory=dict)
    samples: int = 1
    seed: int = 0
    timelapse: int = 0
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    device: str | None = None
    atlas_version: str = "?"
    torch_version: str = "?"
    engine_version: str | None = None
    layers: tuple[dict, ...] = ()  # the planned layers, with the folder each is stored in
    labels: tuple[str, ...] = ()  # the model's class labels: the site names the classes units push
    checkpoint: dict | None = None  # atlas.history's Checkpoint, as JSON
    grow: bool = False  # results.json of `atlas visualize --grow`

    def as_json(self) -> dict:
        """As plan.json and results.json hold it (their units beside it)."""
        data = dataclasses.asdict(self)
        model = {name: data.pop(name) for name in ("spec", "digest", "weights", "preprocessing")}
        data["model"] = model
        data["recipe"] = {"name": data.pop("recipe"), "hash": data.pop("recipe_hash")}
        data["layers"], data["labels"] = list(self.layers), list(self.labels)
        return data

    @classmethod
    def from_json(cls, data: object) -> RunRecord:
        """The run facts of a plan.json, results.json or manifest; results.json of before
        named the model by a string with a `weights_digest` beside it, and its recipe by name
        with a `recipe_hash`. Values of the wrong type take their defaults."""
        data = data if isinstance(data, dict) else {}
        model, recipe = data.get("model"), data.get("recipe")
        flat = dict(data)
        if isinstance(model, dict):
            flat.update((name, model.get(name)) for name in ("spec", "digest", "weights"))
            flat["preprocessing"] = model.get("preprocessing", data.get("preprocessing"))
        elif isinstance(model, str):
            flat.update(spec=model, digest=data.get("weights_digest"))
        if isinstance(recipe, dict):
            flat.update(recipe=recipe.get("name"), recipe_hash=recipe.get("hash"))
        for name in ("layers", "labels"):
            if isinstance(flat.get(name), list):
                flat[name] = tuple(flat[name])
        hints = _run_field_types()
        known = {}
        for item in dataclasses.fields(cls):
            value = flat.get(item.name)
            if value is not None and _fits(value, hints[item.name]):
                known[item.name] = value
        return cls(**known)


@functools.cache
def _run_field_types() -> dict[str, object]:
    return typing.get_type_hints(RunRecord)
