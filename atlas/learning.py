"""The learning step of a run with --concepts K or --activation-atlas N, on the execute side,
before the plan is made: for every concept layer, its activations over the exemplar folder
(sampled by `sample_task` on the workers, which get the images' bytes as in the exemplar
pass), its dictionary of K concepts and its N x N activation atlas (learned on the client),
kept in OUT under their keys. Their concepts and cells then become units of the plan
(atlas.plan.LearnedLayer), optimized like channels, and each one's exemplars, with where it
fires, are stored as its exemplar record (atlas.learned_exemplars).

    OUT/concepts/<layer>/samples-<key>.npz     the layer's sampled activations
    OUT/concepts/<layer>/dictionary-<key>.npz  a dictionary (earlier ones stay, small: a
                                               new one is matched to the one before it)
    OUT/concepts/<layer>/atlas-<key>.npz       an activation atlas
    OUT/concepts/<layer>/learned.json          written last: which of them are current, with
                                               each concept's share and top channels

A new dictionary of a layer (a new checkpoint, folder or seed) has its concepts ordered to
match the dictionary before it (one-to-one by cosine, when both have K concepts over the same
channels), so that concept k of two checkpoints is the nearest thing there is to one concept
and its filmstrip and change score compare like with like; each concept keeps the cosine it
was matched at, and one matched under record.MATCHED gets no change score. An atlas's grid is laid
out anew by UMAP each time: a cell has no history. An unchanged rerun reads learned.json and
the exemplar records, and starts nothing.
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atlas import exemplars
from atlas.concepts.describe import COSINE_POWER, describe
from atlas.concepts.dictionary import Dictionary, check_concepts, concepts_key, learn_concepts
from atlas.concepts.extra import require
from atlas.concepts.grid import (
    MIN_COUNT,
    ActivationAtlas,
    activation_atlas,
    atlas_key,
    check_atlas,
    nearest_concepts,
)
from atlas.concepts.samples import Collection, Samples, Sampling, sample_task, samples_key
from atlas.errors import AtlasError, did_you_mean
from atlas.files import atomic_write_json
from atlas.layers import LayerInfo, glob_regex
from atlas.learned_exemplars import outdated, write_exemplars
from atlas.optim.objectives import Direction
from atlas.plan import Learned, LearnedLayer, Plan
from atlas.progress import Progress
from atlas.record import LOGITS, learned_layer, split_layer
from atlas.store import Store, layer_dirname

if TYPE_CHECKING:
    from atlas.config import AtlasConfig
    from atlas.execute import Executor

LEARNED_VERSION = "1"
# what reading a damaged .npz raises (np.load of an empty file: EOFError; malformed arrays or
# metadata: the others)
DAMAGED = (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile)


def concept_layers(config: AtlasConfig, plan: Plan) -> list[LayerInfo]:
    """The planned layers that get concepts and atlases: those `concept_layers` names, or
    every planned layer but the class logits; a name that matches none is one sentence."""
    planned = [
        info for info in plan.layers if info.name != LOGITS and not isinstance(info, LearnedLayer)
    ]
    names = [info.name for info in planned]
    for pattern in config.concept_layers:
        if not any(glob_regex(pattern).match(name) for name in names):
            raise AtlasError(
                f"concept layer {pattern!r} is not planned{did_you_mean(pattern, names)}: "
                "plan it with --layers"
            )
    if not config.concept_layers:
        return planned
    regexes = [glob_regex(pattern) for pattern in config.concept_layers]
    return [info for info in planned if any(regex.match(info.name) for regex in regexes)]


def matched(new: Dictionary, before: Dictionary | None) -> tuple[Dictionary, list[float | None]]:
    """`new` with its concepts ordered so that concept k is the one matched (one-to-one, by
    cosine: the Hungarian method) to concept k of `before`, and each one's cosine; as it is,
    with no cosines, when there is nothing to match it to (no dictionary before, another K or
    other channels)."""
    if before is None or before.directions.shape != new.directions.shape:
        return new, [None] * new.size
    optimize = require("scipy.optimize", "scikit-learn", "concept dictionaries")
    cosine = new.directions @ before.directions.T
    rows, columns = optimize.linear_sum_assignment(-cosine)
    order = rows[np.argsort(columns)]
    return new.reordered(order), [round(float(cosine[k, j]), 4) for j, k in enumerate(order)]


def paired(dictionary: Dictionary, before: Dictionary | None) -> list[float | None]:
    """The cosine of each concept to the one of its index in `before` (None for each when
    there is nothing to compare it with: no dictionary before, another K or other channels)."""
    if before is None or before.directions.shape != dictionary.directions.shape:
        return [None] * dictionary.size
    cosine = np.sum(dictionary.directions * before.directions, axis=1)
    return [round(float(value), 4) for value in cosine]


@dataclass
class LearningSummary:
    """What the learning step did, as `atlas run` reports it."""

    layers: list[str] = field(default_factory=list)  # layers learned in this run
    exemplars: int = 0  # concepts and cells whose exemplars were stored in this run
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def report(self) -> tuple[str | None, str | None]:
        problem = None
        if self.failures:
            problem = f"concepts: {self.failures[0]}; rerun to retry what failed"
        if not (self.layers or self.exemplars):
            return None, problem
        learned = ", ".join(self.layers) or "nothing new"
        line = (
            f"concepts: learned {learned}; exemplars of {self.exemplars} concepts and cells "
            f"stored in {self.seconds:.1f} s"
        )
        return line, problem


class Learning:
    """The learning of one run: its concept layers and their samples' keys (checked against
    what the folder can give before any work), what OUT holds under those keys, and (on an
    executor) the rest."""

    @classmethod
    def for_run(cls, config: AtlasConfig, model, plan: Plan, store: Store) -> Learning | None:
        """None when the run asks for no concepts or atlas."""
        if not (config.concepts or config.activation_atlas):
            return None
        return cls(config, model, plan, store)

    def __init__(self, config: AtlasConfig, model, plan: Plan, store: Store):
        self.config, self.model, self.store = config, model, store
        self.folder = Path(config.exemplars)
        self.files = exemplars.list_images(self.folder)
        self.sampling = Sampling(seed=config.seed)
        folder_print = exemplars.fingerprint(self.folder, self.files)
        self.layers = concept_layers(config, plan)
        self.infos = {info.name: info for info in self.layers}
        self.keys: dict[str, str] = {}
        for info in self.layers:
            self._check(info)
            key = samples_key(model.identity, info.source, folder_print, self.sampling)
            self.keys[info.name] = key

    def _check(self, info: LayerInfo) -> None:
        """One sentence for a K or N that the layer or the folder cannot support."""
        spots = math.prod(info.shape[1:]) if len(info.shape) == 3 else 1
        per_image, images = self.sampling.sizes(info.channels, spots, len(self.files))
        if self.config.concepts:
            check_concepts(
                self.config.concepts, info.channels, images, per_image * images, info.name
            )
        if self.config.activation_atlas:
            check_atlas(self.config.activation_atlas, info.name, per_image * images, images)

    def folder_of(self, layer: str) -> Path:
        return self.store.out / "concepts" / layer_dirname(layer)

    def state(self, layer: str) -> dict:
        """The layer's learned.json ({} when there is none, or it is damaged: relearned)."""
        path = self.folder_of(layer) / "learned.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            self.store.report(path, "is corrupt", "the layer's concepts are learned again")
            return {}
        return state if isinstance(state, dict) else {}

    def _part(self, layer: str, part: str, size: int) -> dict | None:
        """learned.json's entry for the layer's concepts or atlas when it is current: learned
        from the current samples, of the size asked."""
        state = self.state(layer)
        entry = state.get(part)
        current = (state.get("version"), state.get("samples")) == (
            LEARNED_VERSION,
            self.keys[layer],
        )
        if not (current and isinstance(entry, dict) and entry.get("size") == size):
            return None
        units = entry.get("units")
        whole = isinstance(entry.get("key"), str) and (
            part != "concepts"
            or (
                isinstance(units, list)
                and len(units) == size
                and all(isinstance(u, dict) for u in units)
            )
        )
        if not whole:
            path = self.folder_of(layer) / "learned.json"
            self.store.report(path, f"has a damaged {part} entry", "it is learned again")
            return None
        return entry

    def _load(self, layer: str, part: str, size: int) -> Dictionary | ActivationAtlas | None:
        """The layer's current dictionary or atlas as stored, None when there is none (or its
        file is damaged, named: it is learned again)."""
        entry = self._part(layer, part, size) if size else None
        if entry is None:
            return None
        kind = Dictionary if part == "concepts" else ActivationAtlas
        name = "dictionary" if kind is Dictionary else "atlas"
        path = self.folder_of(layer) / f"{name}-{entry['key'][:16]}.npz"
        return self._reused(path, kind, entry["key"])

    def current(self, layer: str) -> tuple[Dictionary | None, ActivationAtlas | None]:
        """The layer's dictionary and atlas as OUT holds them under the current keys (None
        where not asked for, or not learned yet)."""
        dictionary = self._load(layer, "concepts", self.config.concepts)
        return dictionary, self._load(layer, "atlas", self.config.activation_atlas)

    def stored(self) -> tuple[LearnedLayer, ...]:
        """The learned layers OUT holds under the current keys: what the plan's units are
        (none yet of what is not learned)."""
        found: list[LearnedLayer] = []
        for info in self.layers:
            found += self.learned_layers(info.name, *self.current(info.name))
        return tuple(found)

    def missing(self) -> list[tuple[str, int, bool]]:
        """(learned layer, units, whether that is an upper bound) of what is asked for and not
        learned yet under the current keys: K concepts, up to N x N cells."""
        config, found = self.config, []
        for info in self.layers:
            dictionary, atlas = self.current(info.name)
            if config.concepts and dictionary is None:
                found.append((learned_layer(info.name, "concepts"), config.concepts, False))
            if config.activation_atlas and atlas is None:
                cells = config.activation_atlas**2
                found.append((learned_layer(info.name, "atlas"), cells, True))
        return found

    @property
    def needed(self) -> bool:
        """Whether something is not learned, or some concept or cell lacks its exemplars."""
        return bool(self.missing() or outdated(self, self.stored()))

    def learned_layers(
        self, layer: str, dictionary: Dictionary | None, atlas: ActivationAtlas | None
    ) -> list[LearnedLayer]:
        """The layer's concepts and cells as units of a plan, with the facts their pages show."""
        made = []
        if dictionary is not None:
            facts = self._part(layer, "concepts", dictionary.size)["units"]
            units = tuple(
                (
                    k,
                    Learned(
                        layer, "concept", _direction(f"concept{k}", row), dictionary.key, facts[k]
                    ),
                )
                for k, row in enumerate(dictionary.directions)
            )
            size = dictionary.size
            made.append(
                LearnedLayer(
                    learned_layer(layer, "concepts"),
                    f"{size} concepts of {layer}",
                    (size,),
                    size,
                    of=layer,
                    key=dictionary.key,
                    units=units,
                )
            )
        if atlas is not None:
            cells = []
            for cell in atlas.cells:
                facts = {"row": cell.row, "col": cell.col, "count": cell.count}
                facts["channels"] = [list(pair) for pair in cell.channels]
                nearest = [] if dictionary is None else nearest_concepts(cell.mean, dictionary)
                facts["concepts"] = [list(pair) for pair in nearest]
                unit = Learned(layer, "cell", _direction(cell.name, cell.mean), atlas.key, facts)
                cells.append((cell.row * atlas.size + cell.col, unit))
            size = atlas.size
            made.append(
                LearnedLayer(
                    learned_layer(layer, "atlas"),
                    f"{size} x {size} activation atlas of {layer}",
                    (size, size),
                    len(cells),
                    of=layer,
                    key=atlas.key,
                    units=tuple(cells),
                )
            )
        return made

    # --- learning what is missing ---

    def learn(
        self, pool: Executor, on_progress: Callable[[Progress], None] | None = None
    ) -> tuple[tuple[LearnedLayer, ...], LearningSummary]:
        """Sample, learn and store every concept layer not current in OUT, then the exemplars
        of its concepts and cells; the learned layers OUT now holds. A layer whose work failed
        is named and left for the next run; the others go on."""
        summary = LearningSummary()
        started = time.monotonic()
        missing = {split_layer(name)[0] for name, *_ in self.missing()}
        for info in self.layers:
            if info.name not in missing:
                continue
            samples = self.samples(info, pool, on_progress, summary)
            if samples is None:
                continue
            self._learn_layer(info.name, samples)
            summary.layers.append(info.name)
        learned = self.stored()
        todo = outdated(self, learned)
        if todo:
            write_exemplars(self, todo, pool, summary)
        summary.seconds = time.monotonic() - started
        return learned, summary

    def samples(
        self,
        info: LayerInfo,
        pool: Executor | None,
        on_progress: Callable[[Progress], None] | None = None,
        summary: LearningSummary | None = None,
    ) -> Samples | None:
        """The layer's samples: as stored, else collected on `pool` and stored (None when a
        chunk failed: named in `summary`)."""
        key = self.keys[info.name]
        path = self.folder_of(info.name) / f"samples-{key[:16]}.npz"
        try:
            stored = Samples.load(path)
            if stored.key == key:
                return stored
        except FileNotFoundError:
            pass
        except DAMAGED:
            self.store.report(path, "is corrupt", "the samples are collected again")
        if pool is None:
            return None
        collection = Collection(self.model, info.name, self.folder, self.sampling)
        chunk = exemplars.CHUNK_IMAGES * (1 if pool.device == "cpu" else 4)
        tasks = collection.tasks(chunk)
        total, done, failed = len(collection.chosen), 0, 0
        started = time.monotonic()
        failures = []
        for outcome in pool.map(sample_task, tasks):
            count = len(outcome.task.ids)
            if outcome.error is not None:
                first = outcome.task.ids[0]
                failures.append(f"samples of {info.name} (images {first}-): {outcome.error}")
                failed += count
            else:
                collection.add(outcome.result)
                done += count
            if on_progress:
                on_progress(Progress(done, failed, total, time.monotonic() - started, "images"))
        if failures:
            if summary is not None:
                summary.failures += failures
            return None
        samples = collection.samples()
        samples.save(path)  # beside those of other checkpoints or folders: none is removed
        return samples

    def _learn_layer(self, layer: str, samples: Samples) -> None:
        """The dictionary and atlas asked for that are not current, stored; learned.json
        last."""
        config, folder = self.config, self.folder_of(layer)
        state = self.state(layer)
        fresh = {"version": LEARNED_VERSION, "layer": layer, "samples": samples.key}
        if config.concepts:
            entry = self._part(layer, "concepts", config.concepts)
            if self._load(layer, "concepts", config.concepts) is None:  # or its file is damaged
                entry = self._learn_concepts(layer, samples, state.get("concepts"))
            fresh["concepts"] = entry
        if config.activation_atlas:
            entry = self._part(layer, "atlas", config.activation_atlas)
            if self._load(layer, "atlas", config.activation_atlas) is None:
                size = config.activation_atlas
                key = atlas_key(samples.key, size, MIN_COUNT, config.seed)
                atlas = self._reused(folder / f"atlas-{key[:16]}.npz", ActivationAtlas, key)
                if atlas is None:
                    atlas = activation_atlas(samples, size, min_count=MIN_COUNT, seed=config.seed)
                    atlas.save(folder / f"atlas-{atlas.key[:16]}.npz")
                entry = {"size": atlas.size, "key": atlas.key, "cells": len(atlas.cells)}
            fresh["atlas"] = entry
        atomic_write_json(folder / "learned.json", fresh)

    def _reused(self, path: Path, kind: type, key: str) -> Dictionary | ActivationAtlas | None:
        """The dictionary or atlas an earlier run stored under `key`, None when there is none
        or its file is damaged (named: it is learned again)."""
        try:
            loaded = kind.load(path)
        except FileNotFoundError:
            return None
        except DAMAGED:
            self.store.report(path, "is corrupt", "it is learned again")
            return None
        return loaded if loaded.key == key else None

    def _learn_concepts(self, layer: str, samples: Samples, before: object) -> dict:
        """A new dictionary, matched to the one the layer had before, stored; its entry."""
        folder, concepts, seed = self.folder_of(layer), self.config.concepts, self.config.seed
        previous = None
        if isinstance(before, dict) and isinstance(before.get("key"), str):
            path = folder / f"dictionary-{before['key'][:16]}.npz"
            try:
                previous = Dictionary.load(path)
            except DAMAGED:  # gone or damaged: nothing to match to
                previous = None
        key = concepts_key(samples, concepts, seed=seed)
        dictionary = self._reused(folder / f"dictionary-{key[:16]}.npz", Dictionary, key)
        if dictionary is None:
            dictionary, cosines = matched(learn_concepts(samples, concepts, seed=seed), previous)
            dictionary.save(folder / f"dictionary-{dictionary.key[:16]}.npz")
        else:  # ordered when it was learned: concept k against concept k of the one before
            cosines = paired(dictionary, previous)
        concepts = describe(samples, dictionary)
        return {
            "size": dictionary.size,
            "key": dictionary.key,
            "method": dictionary.method,
            "explained": round(dictionary.explained(samples.vectors), 4),
            "matched_to": previous.key if previous is not None and cosines[0] is not None else None,
            "units": [
                {
                    "share": concept.share,
                    "channels": [list(pair) for pair in concept.channels],
                    "matched": cosine,
                }
                for concept, cosine in zip(concepts, cosines, strict=True)
            ],
        }


def _direction(name: str, values: np.ndarray) -> Direction:
    return Direction(name, tuple(float(v) for v in values), COSINE_POWER)
