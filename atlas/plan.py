"""config -> units and tasks, each with a content key.

A unit's key is the sha256 of everything that decides its files: the model's identity (the
weights digest and the preprocessing, atlas.models.loaded), the layer and what of it the
objective reads, the unit index, the recipe hash, K, the seed, the engine
version and the timelapse interval.
Every image has its own random stream, so a unit is made the same way whichever task it shares:
units (not tasks) are what the store caches, and a task batches units of one layer that still
need work. A unit's batch-mates are not in its key: another batch gives another picture, not
the same bytes (atlas.optim.loop), that scores as unchanged (bench/batch_invariance.py).

A layer's concepts and activation-atlas cells (atlas.learning) are units of a learned layer of
their own ("blocks.8~concepts", "blocks.8~atlas"), listed after their real layer, whose units
carry the direction their objective reads on the real layer; their keys also hold the kind,
the direction's digest and the key of the dictionary or atlas it comes from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from atlas import models
from atlas.config import AtlasConfig, parse_indices
from atlas.errors import AtlasError, did_you_mean
from atlas.layers import LayerInfo, select
from atlas.mainpath import default_layers
from atlas.models import LoadedModel
from atlas.optim.objectives import Direction, Target, neuron, unit_target, whole_layer
from atlas.optim.recipes import Recipe
from atlas.record import LOGITS, MATCHED, split_layer

# Bump when the engine's images for equal inputs change: every unit is then recomputed.
ENGINE_VERSION = "2"  # 2: unit records carry circuits, class effects and activation maps


@dataclass(frozen=True)
class Learned:
    """What makes a unit a concept or an activation-atlas cell: the real layer it is a
    direction over, its kind ("concept" or "cell"), the direction its objective reads (named
    "concept3", "cell2-5"), the key of the dictionary or atlas it comes from, and the facts
    its pages show (UnitRecord.direction)."""

    of: str
    kind: str
    direction: Direction
    source_key: str
    facts: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def record(self) -> dict:
        """What its unit's record holds of it (UnitRecord.direction)."""
        return {"of": self.of, **self.facts}

    @property
    def followed(self) -> bool:
        """Whether its picture at the previous checkpoint is of the same thing: a concept
        matched to the one of its index in the dictionary before (atlas.learning), never a
        cell (an activation atlas is laid out anew each time)."""
        cosine = self.facts.get("matched")
        return self.kind == "concept" and isinstance(cosine, int | float) and cosine >= MATCHED


@dataclass(frozen=True)
class LearnedLayer(LayerInfo):
    """A learned layer ("blocks.8~concepts", "blocks.8~atlas") as the plan lists it, after its
    real layer `of`; `units` its concepts or cells by index (an atlas's empty cells have
    none), `key` that of its dictionary or atlas."""

    of: str = ""
    key: str = ""
    units: tuple[tuple[int, Learned], ...] = field(default=(), compare=False, repr=False)

    def as_dict(self) -> dict:
        """As plan.json lists it: `concepts_of` or `atlas_of` its real layer."""
        facts = {name: getattr(self, name) for name in ("name", "type", "shape", "channels")}
        return {**facts, f"{split_layer(self.name)[1]}_of": self.of, "key": self.key}


@dataclass(frozen=True)
class Unit:
    """A channel, a class logit, (index None) a whole layer, or a learned direction (a concept,
    a cell; `learned`): one image, or K, each."""

    layer: str
    index: int | None
    key: str
    label: str | None = None
    variants: tuple[str, ...] = ()  # extra images of this unit: "neuron", "negative"
    learned: Learned | None = None

    @property
    def id(self) -> str:
        if self.learned is not None:
            return f"{self.learned.of}:{self.learned.direction.name}"
        return self.layer if self.index is None else f"{self.layer}:{self.index}"

    @property
    def kind(self) -> str:
        if self.learned is not None:
            return self.learned.kind
        if self.index is None:
            return "layer"
        return "logit" if self.layer == LOGITS else "channel"

    def target(self) -> Target:
        if self.learned is not None:
            return Target(self.learned.of, "direction", direction=self.learned.direction)
        if self.index is None:
            return whole_layer(self.layer)
        return unit_target(self.layer, self.index)

    def variant_targets(self) -> list[Target]:
        """The targets of this unit's variants, in `variants` order."""
        made = {
            "neuron": lambda: neuron(self.layer, self.index),
            "negative": lambda: dataclasses.replace(self.target(), negative=True),
        }
        return [made[name]() for name in self.variants]

    def as_json(self) -> dict:
        """The unit as plan.json lists it; the store reads it as a missing UnitRecord."""
        listed = {"id": self.id, "layer": self.layer, "kind": self.kind, "index": self.index,
                  "label": self.label, "key": self.key}  # fmt: skip
        if self.learned is not None:
            listed["direction"] = self.learned.record
        return listed


@dataclass(frozen=True)
class Task:
    """One batch of units of one layer: the unit of work sent to a worker."""

    layer: str
    units: tuple[Unit, ...]
    recipe: Recipe
    samples: int
    seed: int
    timelapse: int = 0  # keep a frame every N steps (0: no animation)
    inputs_from: str | None = None  # the planned layer whose channels feed these units
    # each unit's image at the previous checkpoint (WebP, None where it had none): the worker
    # scores the unit's change against it (atlas.change); not part of the key
    previous: tuple[bytes | None, ...] = ()
    previous_from: str | None = None  # that checkpoint's id

    @property
    def key(self) -> str:
        text = "|".join(unit.key for unit in self.units)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def name(self) -> str:
        """How executors name the task (the Dask dashboard shows it): layer and key."""
        return f"{self.layer}-{self.key[:16]}"


@dataclass(frozen=True)
class Plan:
    config: AtlasConfig
    spec: str
    digest: str
    layers: tuple[LayerInfo, ...]
    units: tuple[Unit, ...]

    def units_per_layer(self) -> Counter:
        return Counter(unit.layer for unit in self.units)

    def inputs_from(self, layer: str) -> str | None:
        """The planned layer whose channels a layer's units list as inputs: the one before it
        (for the class logits, the last planned layer; for concepts and cells, the one before
        their real layer); None for the first."""
        real = [info.name for info in self.layers if not isinstance(info, LearnedLayer)]
        return inputs_from(real, split_layer(layer)[0])


def inputs_from(planned: list[str], layer: str) -> str | None:
    position = planned.index(layer)
    return planned[position - 1] if position > 0 else None


def unit_key(
    identity: str,
    source: str,
    index: int,
    recipe: Recipe,
    samples: int,
    seed: int,
    timelapse: int = 0,
    inputs: str | None = None,
    variants: tuple[str, ...] = (),
    learned: Learned | None = None,
) -> str:
    """The unit's content key; `identity` is the model's (LoadedModel.identity), `source` its
    layer's LayerInfo.source (a learned unit's: its real layer's) and `inputs` the layer its
    circuit reads (what the record's inputs are channels of); `index` None is the layer's
    whole-layer image."""
    fields = [
        identity,
        source,
        index,
        recipe.hash,
        samples,
        seed,
        ENGINE_VERSION,
        timelapse,
        inputs,
    ]
    fields += [list(variants)] if variants else []  # in the key only when asked for
    if learned is not None:  # what a channel's key never held: channels keep their keys
        fields.append([learned.kind, learned.direction.digest, learned.source_key])
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def default_layer_patterns(model) -> tuple[str, ...]:
    """The layers an atlas shows when none are chosen: the model's own list, else its main
    path (atlas.mainpath)."""
    if model.default_layers:
        return model.default_layers
    return tuple(default_layers(model))


def make_plan(
    config: AtlasConfig,
    model,
    identity: str | None = None,
    learned: tuple[LearnedLayer, ...] = (),
) -> Plan:
    """Every planned unit, in layer order then index order, with its key; the `learned`
    layers (atlas.learning) after their real layers. `identity` is what the keys hold of the
    model (default: `model.identity`)."""
    identity = model.identity if identity is None else identity
    patterns = config.layers or default_layer_patterns(model)
    layers = [layer for layer in select(model, patterns) if layer.name != LOGITS]
    chosen_names = [layer.name for layer in layers]
    for name, _ in config.channels_per_layer:
        if name not in chosen_names:
            hint = did_you_mean(name, chosen_names)
            raise AtlasError(f"channels_per_layer names {name!r}, which is not planned{hint}")
    logits = next((layer for layer in model.layers if layer.name == LOGITS), None)
    with_logits = chosen_names + ([LOGITS] if logits is not None and config.classes.strip() else [])
    units: list[Unit] = []

    def add(layer: LayerInfo, indices: list, labels=None, made: LearnedLayer | None = None):
        """Units of `layer`, or (with `made`) of its learned layer `made`, by index."""
        learned_units = dict(made.units) if made is not None else {}
        for index in indices:
            unit = learned_units.get(index)
            variants = unit_variants(config.variants, layer, index) if unit is None else ()
            key = unit_key(
                identity,
                layer.source,
                index,
                config.recipe_for(unit is not None),
                config.samples,
                config.seed,
                config.timelapse,
                inputs_from(with_logits, layer.name),
                variants,
                unit,
            )
            label = labels[index] if labels and index is not None else None
            name = layer.name if made is None else made.name
            units.append(Unit(name, index, key, label, variants, unit))

    chosen: list[LayerInfo] = []
    for layer in layers:
        spec = config.channels_for(layer.name)
        whole = [None] if "layer" in config.variants else []
        add(layer, whole + parse_indices(spec, layer.channels, "channel", owner=layer.name))
        chosen.append(layer)
        for made in (made for made in learned if made.of == layer.name):
            add(layer, [index for index, _ in made.units], made=made)
            chosen.append(made)
    if logits is not None and config.classes.strip():
        classes = parse_indices(
            config.classes, logits.channels, "class", model.labels, owner=model.spec
        )
        add(logits, classes, model.labels)
        chosen.append(logits)
    if not units:
        raise AtlasError("the plan is empty: choose some layers, channels or classes")
    return Plan(config, model.spec, model.digest, tuple(chosen), tuple(units))


def unit_variants(asked: tuple[str, ...], layer: LayerInfo, index: int | None) -> tuple:
    """The asked variants that a unit has: none for a whole-layer image, no neuron for a
    layer without a map (a class logit, pooled features)."""
    if index is None:
        return ()
    has_map = len(layer.shape) == 3
    return tuple(v for v in asked if v == "negative" or (v == "neuron" and has_map))


def load_and_plan(config: AtlasConfig) -> tuple[LoadedModel, Plan]:
    """The configured model, loaded in this process, and the plan made with it."""
    model = models.load(config.model, config.weights)
    return model, make_plan(config, model)


def default_batch(layer: LayerInfo, device: str) -> int:
    """Units per task: on a CPU small batches are fastest (bench/speed.py: batch 1 and 4
    about 1.25x faster per unit than 8 on Lite0); on a GPU, as many as fit a modest
    activation budget (a task that runs out of memory splits itself)."""
    if device == "cpu":
        return 4
    elements = 1
    for size in layer.shape:
        elements *= size
    return max(8, min(128, 2 ** int(24 - elements.bit_length())))


def units_per_task(config: AtlasConfig, layer: LayerInfo, device: str) -> int:
    """How many units of `layer` one task holds: the batch of images (`--batch`, else the
    layer's default on `device`), shared by each unit's K samples."""
    size = config.batch or default_batch(layer, device)
    return max(1, size // config.samples) if config.samples > 1 else size


def make_tasks(plan: Plan, units: list[Unit], device: str) -> list[Task]:
    """Batches `units` (those still to do) into tasks of one layer each."""
    config = plan.config
    by_layer = {layer.name: layer for layer in plan.layers}
    tasks = []
    for layer_name, kind in dict.fromkeys((unit.layer, unit.kind) for unit in units):
        todo = [unit for unit in units if (unit.layer, unit.kind) == (layer_name, kind)]
        # a learned layer's units run on its real layer: they batch as its channels do
        size = units_per_task(config, by_layer[split_layer(layer_name)[0]], device)
        for first in range(0, len(todo), size):
            batch = tuple(todo[first : first + size])
            tasks.append(
                Task(
                    layer_name,
                    batch,
                    config.recipe_for(layer_name != split_layer(layer_name)[0]),
                    config.samples,
                    config.seed,
                    config.timelapse,
                    plan.inputs_from(layer_name),
                )
            )
    return tasks
