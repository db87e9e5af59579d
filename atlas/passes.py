"""The passes over a whole plan, on the execute side: after the units are optimized, each pass
finds what of the plan it still has to do, runs its tasks on the run's executor, and stores
what they return. The analysis modules (atlas.exemplars, atlas.trust) hold only what a worker
computes. A run makes the passes in PASSES order, each once the one before it has stored its
results (trust reads the exemplars this run found); a new pass is one more entry there.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from atlas import exemplars, trust
from atlas.analysis import EvidenceTask, evidence_task
from atlas.files import atomic_write_bytes, encode_image
from atlas.layers import resolve, select
from atlas.optim.objectives import Target, unit_target
from atlas.plan import Plan, default_layer_patterns
from atlas.progress import Progress
from atlas.record import LOGITS, LOW_TRUST, UnitRecord, split_layer
from atlas.store import Store

if TYPE_CHECKING:
    from atlas.config import AtlasConfig
    from atlas.execute import Executor


class PassSummary(Protocol):
    """What a pass did, as `atlas run` reports it."""

    failures: list[str]

    def report(self) -> tuple[str | None, str | None]:
        """A line for stdout and one for stderr (None: nothing to say)."""
        ...


class Pass(Protocol):
    """One pass of a run: made for the run (None when its config does not ask for it), then
    computed on the executor when it has work."""

    @classmethod
    def for_run(cls, config: AtlasConfig, model, plan: Plan, store: Store) -> Pass | None: ...

    @property
    def needed(self) -> bool: ...

    def compute(
        self, pool: Executor, on_progress: Callable[[Progress], None] | None
    ) -> PassSummary: ...


@dataclass
class ExemplarSummary:
    images: int
    unreadable: int
    units: int  # units whose exemplars were collected in this run
    failures: list[str] = field(default_factory=list)  # chunks that failed: nothing stored

    def report(self) -> tuple[str | None, str | None]:
        if self.failures:
            return None, (
                f"exemplars: {len(self.failures)} chunks of images failed, nothing stored yet; "
                "rerun to retry just those"
            )
        return (
            f"exemplars: {self.images} images ({self.unreadable} unreadable, skipped) "
            f"for {self.units} units",
            None,
        )


class ExemplarPass:
    """The exemplar work of one run: which units lack current exemplars of the folder, then
    (on an executor) the pass over the images and the stored results."""

    @classmethod
    def for_run(cls, config: AtlasConfig, model, plan: Plan, store: Store) -> ExemplarPass | None:
        if not config.exemplars:
            return None
        return cls(model, plan.units, config.exemplars, store.out, config.exemplars_top)

    def __init__(self, model, plan_units, folder: str | Path, out: Path, top: int):
        self.model, self.top = model, top
        self.folder = Path(folder)
        self.files = exemplars.list_images(self.folder)
        self.store = Store(out)
        folder_print = exemplars.fingerprint(self.folder, self.files)
        stored = self.store.exemplars()
        self.keys: dict[tuple[str, int], str] = {}
        identity = model.identity
        for unit in plan_units:
            # a whole-layer image: no single unit to rank images by; a concept's or a cell's
            # exemplars come from the samples it was learned from (atlas.learning)
            if unit.index is None or unit.learned is not None:
                continue
            source = resolve(model, unit.layer).source
            key = exemplars.exemplar_key(identity, source, unit.index, folder_print, top)
            if stored.get((unit.layer, unit.index), {}).get("key") != key:
                self.keys[(unit.layer, unit.index)] = key
        self.units: dict[str, list[int]] = {}
        for layer, index in self.keys:
            self.units.setdefault(layer, []).append(index)
        units = sorted(self.units.items())
        text = json.dumps([identity, folder_print, top, units, exemplars.EXEMPLAR_VERSION])
        self.pass_key = hashlib.sha256(text.encode()).hexdigest()

    @property
    def needed(self) -> bool:
        return bool(self.keys)

    def compute(
        self, pool: Executor, on_progress: Callable[[Progress], None] | None = None
    ) -> ExemplarSummary:
        """Every chunk not done by an earlier, interrupted run of this same pass. What has been
        merged is saved every SAVE_EVERY_SECONDS (atlas.exemplars) and when a chunk fails, so
        that a killed or failed run resumes where it was; results are stored only once every
        chunk is done.
        `on_progress` hears after each chunk of the images this run had left to do."""
        saved = self.store.read_exemplar_progress(self.pass_key)
        merged = exemplars.TopK.from_json(self.top, saved["best"] if saved else {})
        done = set(saved["done"] if saved else [])
        unreadable = set(saved["unreadable"] if saved else [])
        chunk = (
            saved["chunk"] if saved else exemplars.CHUNK_IMAGES * (1 if pool.device == "cpu" else 4)
        )
        failures = []

        def save() -> None:
            progress = {"pass": self.pass_key, "chunk": chunk, "best": merged.as_json()}
            progress.update(done=sorted(done), unreadable=sorted(unreadable))
            self.store.write_exemplar_progress(progress)

        started = saved_at = time.monotonic()
        total = len(self.files)
        left = total - sum(min(chunk, total - first) for first in done)
        images_done = images_failed = 0
        tasks = exemplars.read_chunks(self.files, self.units, self.top, chunk, done)
        for outcome in pool.map(exemplars.exemplar_task, tasks):
            first, count = outcome.task.first, len(outcome.task.blobs)
            if outcome.error is not None:
                failures.append(f"exemplars of images {first}-{first + count - 1}: {outcome.error}")
                images_failed += count
            else:
                result = outcome.result
                merged.merge(result["layers"])
                done.add(result["first"])
                images_done += count
                unreadable.update(result["first"] + p for p in result["unreadable"])
                if time.monotonic() - saved_at >= exemplars.SAVE_EVERY_SECONDS:
                    save()
                    saved_at = time.monotonic()
            if on_progress:
                elapsed = time.monotonic() - started
                on_progress(Progress(images_done, images_failed, left, elapsed, "images"))
        summary = ExemplarSummary(len(self.files), len(unreadable), len(self.keys), failures)
        if failures:
            save()
            summary.units = 0
            return summary
        self._write(merged, sorted(unreadable))
        self.store.clear_exemplar_progress()
        return summary

    def _write(self, merged: exemplars.TopK, unreadable: list[int]) -> None:
        """Patches first, each unit's JSON last, then the folder summary."""
        model, size = self.model, self.model.input_size
        for layer, indices in self.units.items():
            best = merged.best.get(layer)
            shape = resolve(model, layer).shape
            map_size = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
            reach = exemplars.receptive_halfwidth(model, layer)
            for column, index in enumerate(indices):
                items = []
                key = self.keys[(layer, index)]
                for rank in range(0 if best is None else best["scores"].shape[0]):
                    image_id = int(best["ids"][rank, column])
                    row, col = int(best["rows"][rank, column]), int(best["cols"][rank, column])
                    box = exemplars.patch_box(row, col, map_size, reach, size)
                    try:
                        patch = exemplars.cut_patch(
                            self.files[image_id], box, size, model.input_channels, model.crop
                        )
                    except exemplars.DECODE_ERRORS:  # changed or removed since the pass read it
                        continue
                    # the key in the name: an interrupted rewrite never mixes old and new
                    path = self.store.exemplar_path(layer, index, f".{key[:8]}.{rank}.webp")
                    atomic_write_bytes(path, encode_image(patch, quality=85))
                    items.append(
                        {
                            "image": path.relative_to(self.store.out).as_posix(),
                            "source": self.files[image_id].relative_to(self.folder).as_posix(),
                            "score": round(float(best["scores"][rank, column]), 5),
                            "box": [round(edge, 1) for edge in box],
                        }
                    )
                self.store.save_exemplars(
                    {
                        "layer": layer,
                        "index": index,
                        "key": key,
                        "digest": model.digest,
                        "items": items,
                    }
                )
        self.store.write_exemplar_summary(
            {
                "folder": str(self.folder),
                "images": len(self.files),
                "unreadable": [
                    self.files[i].relative_to(self.folder).as_posix() for i in unreadable
                ],
            }
        )


@dataclass
class TrustSummary:
    units: int  # units scored in this run
    low: int  # of them, under LOW_TRUST
    failures: list[str] = field(default_factory=list)

    def report(self) -> tuple[str | None, str | None]:
        scored = f"trust: {self.units} units scored, {self.low} under {LOW_TRUST}"
        return (scored if self.units else None), None


class TrustPass:
    """The trust work of one run: which units need a score (done, with current exemplars,
    and no score for their present key), the images to read, and the stored scores."""

    @classmethod
    def for_run(cls, config: AtlasConfig, model, plan: Plan, store: Store) -> TrustPass | None:
        if not config.exemplars:
            return None
        targets = {(unit.layer, unit.index): unit.target() for unit in plan.units}
        return cls(trust_path(model, plan), config.exemplars, store.out, targets)

    def __init__(
        self,
        path: list[str],
        folder: str | Path,
        out: Path,
        targets: dict[tuple[str, int | None], Target] | None = None,
    ):
        """`path`: the layers whose patterns judge a unit, in the model's order (its main path
        and the planned layers); a unit is judged by those before it (a concept by those
        before its real layer). `targets`: what the planned units maximize, by (layer, index)
        (a unit not there is a channel or a class)."""
        self.store = Store(out)
        self.folder = Path(folder)
        self.targets = targets or {}
        units, _ = self.store.classify()
        stored = self.store.exemplars(verify=False)
        planned = [name for name in path if name != LOGITS]
        self.todo = []  # (unit record, exemplar record, earlier layers)
        for unit in units:
            found = stored.get((unit.layer, unit.index))
            if unit.status != "done" or not unit.images or found is None or not unit.exemplars:
                continue
            stored_trust = found.get("trust") or {}
            if (stored_trust.get("unit_key"), stored_trust.get("version")) == (
                unit.key,
                trust.TRUST_VERSION,
            ):
                continue
            if split_layer(unit.layer)[1] and (unit.layer, unit.index) not in self.targets:
                continue  # a concept no longer planned: its direction is not known here
            real = split_layer(unit.layer)[0]
            before = planned.index(real) if real in planned else len(planned)
            earlier = planned[:before]
            self.todo.append((unit, found, earlier))

    @property
    def needed(self) -> bool:
        return bool(self.todo)

    def compute(
        self, pool: Executor, on_progress: Callable[[Progress], None] | None = None
    ) -> TrustSummary:
        """Compute and store every needed score, and each unit's inputs and class effects
        measured on its pictures and exemplars together (nothing is stored when any of the
        work failed: the next run retries it)."""
        files = exemplars.list_images(self.folder)
        picked = np.random.default_rng(trust.RANDOM_SEED).choice(
            len(files), min(trust.RANDOM_IMAGES, len(files)), replace=False
        )
        randoms = [str(files[i]) for i in sorted(picked)]
        patterns, failures = self._patterns(pool, randoms)
        evidence: dict[tuple[str, int], dict] = {}
        tasks = [self._evidence_task(unit, found) for unit, found, _ in self.todo]
        for outcome in pool.map(evidence_task, tasks):
            task = outcome.task
            if outcome.error is not None:
                failures.append(f"inputs of {task.layer}:{task.index}: {outcome.error}")
            else:
                evidence[(task.layer, task.index)] = outcome.result
        if failures:
            return TrustSummary(0, 0, failures)
        baseline = [patterns[p] for p in randoms if p in patterns]
        summary = TrustSummary(len(self.todo), 0)
        for unit, found, earlier in self.todo:
            judged = {
                "unit_key": unit.key,
                "version": trust.TRUST_VERSION,
                "score": None,
                "layers": [],
                "agreement": None,
            }
            picture = patterns.get(str(self.store.out / unit.images[0]))
            shown = [patterns.get(str(self.folder / item["source"])) for item in found["items"]]
            shown = [pattern for pattern in shown if pattern is not None]
            if earlier and picture is not None and baseline:
                judged |= trust.trust_score(
                    {layer: picture[layer] for layer in earlier},
                    [{layer: e[layer] for layer in earlier} for e in shown],
                    [{layer: r[layer] for layer in earlier} for r in baseline],
                )
            measured = evidence[(unit.layer, unit.index)]
            judged.update(
                images=measured["images"],
                inputs=[list(pair) for pair in measured["inputs"]],
                classes=[list(pair) for pair in measured["classes"]],
            )
            self.store.save_exemplars({**found, "trust": judged})
            summary.low += judged["score"] is not None and judged["score"] < LOW_TRUST
        return summary

    def _patterns(
        self, pool: Executor, randoms: list[str]
    ) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
        """Every needed image's channel means at the layers some score reads, by path."""
        wanted: dict[str, None] = dict.fromkeys(randoms)
        for unit, found, earlier in self.todo:
            if earlier:
                wanted[str(self.store.out / unit.images[0])] = None
                wanted.update((str(self.folder / item["source"]), None) for item in found["items"])
        layers = tuple(sorted({layer for *_, earlier in self.todo for layer in earlier}))
        paths = list(wanted)
        patterns: dict[str, dict[str, np.ndarray]] = {}
        failures = []
        if not layers:
            return patterns, failures
        for outcome in pool.map(trust.pattern_task, _chunks(paths, layers, pool.device)):
            if outcome.error is not None:
                failures.append(f"trust of images {outcome.task.first}-: {outcome.error}")
                continue
            result = outcome.result
            for row, position in enumerate(result["kept"]):
                path = paths[result["first"] + position]
                patterns[path] = {n: v[row] for n, v in result["layers"].items()}
        return patterns, failures

    def _evidence_task(self, unit: UnitRecord, found: dict) -> EvidenceTask:
        paths = [self.store.out / name for name in unit.images]
        paths += [self.folder / item["source"] for item in found["items"]]
        target = self.targets.get((unit.layer, unit.index)) or unit_target(unit.layer, unit.index)
        blobs = exemplars.read_blobs(paths)
        return EvidenceTask(unit.layer, unit.index, target, unit.inputs_from, blobs)


def _chunks(paths: list[str], layers: tuple[str, ...], device: str) -> Iterator[trust.PatternTask]:
    size = exemplars.CHUNK_IMAGES * (1 if device == "cpu" else 4)
    for first in range(0, len(paths), size):
        yield trust.PatternTask(
            first, exemplars.read_blobs([Path(p) for p in paths[first : first + size]]), layers
        )


def trust_path(model, plan: Plan) -> list[str]:
    """The layers whose activation patterns judge a unit's picture (atlas.trust): the model's
    main path and the planned layers, in the model's order."""
    chosen = {layer.name for layer in select(model, default_layer_patterns(model))}
    chosen |= {layer.name for layer in plan.layers}
    return [layer.name for layer in model.layers if layer.name in chosen]


# the order a run makes them in: trust reads the exemplars the exemplar pass stored
PASSES: tuple[type[Pass], ...] = (ExemplarPass, TrustPass)


def pending_passes(config: AtlasConfig, model, plan: Plan, store: Store) -> Iterator[Pass]:
    """The passes this run asks for that have work, each made only once the one before it
    has run (so that it sees what that one stored)."""
    for kind in PASSES:
        made = kind.for_run(config, model, plan, store)
        if made is not None and made.needed:
            yield made
