"""How far to trust a unit's picture: does its visualization reach the unit the way natural
images do?

Geirhos et al. (2023) showed that a visualization can drive a unit through another path than
natural images do. The check here follows that idea. At each planned layer before the unit,
take every image's channel means (its activation pattern), centred on the mean over random
images of the exemplar folder. A picture that reaches the unit the natural way has a pattern
pointing where its top exemplars' patterns point:

    agreement(x) at layer P = cos(x - mean, exemplars' centroid - mean)
    ratio at layer P        = (agreement(picture) - chance) / (typical - chance)
    trust                   = the mean ratio over the layers, clipped to [0, 1]

where `typical` is an exemplar's agreement with the other exemplars' centroid and `chance`
a random image's, both averaged.

1 means the picture looks, on the way up, as much like the exemplars as an exemplar does; 0
means no more than a random image. It needs exemplars (`--exemplars DIR`) and an earlier
planned layer. The activations are computed on the workers, in chunks of images, like the
exemplar pass; the scores are stored in the unit's exemplar record with the unit key they were
computed for, so they are redone only when the picture or the exemplars change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from atlas.analysis import EvidenceTask, evidence_task
from atlas.exemplars import CHUNK_IMAGES, decode, list_images
from atlas.layers import capture, deepest, run_forward
from atlas.names import LOGITS
from atlas.optim.device import resolve_device
from atlas.optim.fold import running_module
from atlas.record import UnitRecord
from atlas.store import Store

if TYPE_CHECKING:
    from atlas.execute import Executor

RANDOM_IMAGES = 64  # folder images: half set each layer's mean, half what chance agreement is
RANDOM_SEED = 0
LOW_TRUST = 0.3  # below this, the layer grid flags a unit
MIN_SPREAD = 0.1  # exemplars must agree this much more than random images to judge by


@dataclass(frozen=True)
class PatternTask:
    """Images (their bytes) whose channel means are wanted at `layers`."""

    first: int
    blobs: tuple[bytes, ...]
    layers: tuple[str, ...]

    @property
    def name(self) -> str:
        digest = hashlib.sha256(b"".join(self.blobs[:1]) + str(len(self.blobs)).encode())
        return f"trust-{self.first}-{digest.hexdigest()[:12]}"


def pattern_task(model, task: PatternTask, device: str | None = None) -> dict:
    """Per layer, [n, C] channel means (float32) of the chunk's decodable images; `kept` are
    their positions in the chunk."""
    device = resolve_device(device)
    images, kept = decode(task.blobs, model.input_size, model.input_channels)
    result = {"first": task.first, "kept": kept, "layers": {}}
    if not kept:
        return result
    layers = list(task.layers)
    module = running_module(model, layers).to(device)
    with torch.no_grad(), capture(model, layers, deepest(model, layers), module) as acts:
        run_forward(module, model.normalize.to(device)(images.to(device)))
        for layer in layers:
            act = acts[layer].float()
            means = act.flatten(2).mean(2) if act.dim() == 4 else act
            result["layers"][layer] = means.cpu().numpy()
    return result


def trust_score(
    picture: dict[str, np.ndarray],
    exemplars: list[dict[str, np.ndarray]],
    randoms: list[dict[str, np.ndarray]],
) -> tuple[float | None, dict[str, float]]:
    """The trust score and the ratio at each layer (see the module's docstring); None when
    no layer can say (fewer than two exemplars, or exemplars no closer to their centroid than
    random images are)."""
    ratios = {}
    # half the random images set the mean, the other half what chance agreement is: compared
    # with the images that set it, anything would look a little like anything else
    centring, baseline = randoms[::2], randoms[1::2]
    for layer in picture:
        mean = np.mean([r[layer] for r in centring], axis=0)
        found = np.stack([e[layer] for e in exemplars]) - mean
        if len(found) < 2:
            continue
        total = found.sum(0)
        centroid = total / len(found)
        # each exemplar against the others' centroid, so that none is compared with itself
        typical = np.mean([_cos(e, (total - e) / (len(found) - 1)) for e in found])
        chance = np.mean([_cos(r[layer] - mean, centroid) for r in baseline])
        if typical - chance < MIN_SPREAD:  # the exemplars share no direction at this layer
            continue
        agreement = _cos(picture[layer] - mean, centroid)
        ratios[layer] = round(float((agreement - chance) / (typical - chance)), 4)
    if not ratios:
        return None, ratios
    return round(float(np.clip(np.mean(list(ratios.values())), 0, 1)), 4), ratios


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 0.0


class TrustPass:
    """The trust work of one run: which units need a score (done, with current exemplars,
    and no score for their present key), the images to read, and the stored scores."""

    def __init__(self, plan_layers: list[str], folder: str | Path, out: Path):
        self.store = Store(out)
        self.folder = Path(folder)
        units, _ = self.store.classify()
        stored = self.store.exemplars(verify=False)
        planned = [name for name in plan_layers if name != LOGITS]
        self.todo = []  # (unit record, exemplar record, earlier layers)
        for unit in units:
            found = stored.get((unit.layer, unit.index))
            if unit.status != "done" or not unit.images or found is None or not unit.exemplars:
                continue
            if (found.get("trust") or {}).get("unit_key") == unit.key:
                continue
            earlier = planned if unit.layer == LOGITS else planned[: planned.index(unit.layer)]
            self.todo.append((unit, found, earlier))

    @property
    def needed(self) -> bool:
        return bool(self.todo)

    def run(self, pool: Executor) -> list[str]:
        """Compute and store every needed score, and each unit's inputs and class effects
        measured on its pictures and exemplars together; returns failures (nothing is stored
        for a unit whose work failed)."""
        files = list_images(self.folder)
        picked = np.random.default_rng(RANDOM_SEED).choice(
            len(files), min(RANDOM_IMAGES, len(files)), replace=False
        )
        randoms = [str(files[i]) for i in sorted(picked)]
        patterns, failures = self._patterns(pool, randoms)
        evidence: dict[tuple[str, int], dict] = {}
        tasks = [self._evidence_task(unit, found) for unit, found, _ in self.todo]
        for outcome in pool.run(evidence_task, tasks):
            task = outcome.task
            if outcome.error is not None:
                failures.append(f"inputs of {task.layer}:{task.index}: {outcome.error}")
            else:
                evidence[(task.layer, task.index)] = outcome.result
        if failures:
            return failures
        baseline = [patterns[p] for p in randoms if p in patterns]
        for unit, found, earlier in self.todo:
            score, ratios = None, {}
            picture = patterns.get(str(self.store.out / unit.images[0]))
            shown = [patterns.get(str(self.folder / item["source"])) for item in found["items"]]
            shown = [pattern for pattern in shown if pattern is not None]
            if earlier and picture is not None and baseline:
                score, ratios = trust_score(
                    {layer: picture[layer] for layer in earlier},
                    [{layer: e[layer] for layer in earlier} for e in shown],
                    [{layer: r[layer] for layer in earlier} for r in baseline],
                )
            measured = evidence[(unit.layer, unit.index)]
            trust = {"unit_key": unit.key, "score": score, "layers": ratios}
            trust.update(
                images=measured["images"],
                inputs=[list(pair) for pair in measured["inputs"]],
                classes=[list(pair) for pair in measured["classes"]],
            )
            self.store.save_exemplars({**found, "trust": trust})
        return []

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
        for outcome in pool.run(pattern_task, _chunks(paths, layers, pool.device)):
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
        return EvidenceTask(unit.layer, unit.index, unit.inputs_from, _read(paths))


def _read(paths: list[Path]) -> tuple[bytes, ...]:
    """Each file's bytes; one that cannot be read is an empty blob (it does not decode)."""
    blobs = []
    for path in paths:
        try:
            blobs.append(Path(path).read_bytes())
        except OSError:
            blobs.append(b"")
    return tuple(blobs)


def _chunks(paths: list[str], layers: tuple[str, ...], device: str) -> Iterator[PatternTask]:
    size = CHUNK_IMAGES * (1 if device == "cpu" else 4)
    for first in range(0, len(paths), size):
        yield PatternTask(first, _read([Path(p) for p in paths[first : first + size]]), layers)
