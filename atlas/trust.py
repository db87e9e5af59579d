"""How far to trust a unit's picture: does its visualization reach the unit the way natural
images do?

Geirhos et al. (2023) showed that a visualization can drive a unit through another path than
natural images do: a picture that excites the unit as much as its exemplars can still be, on
the way up, nothing like a natural image. The check here looks at that path. At each layer of
the model's main path before the unit (and each planned one), an image's activation pattern is
its channel means, standardized by those of 64 random images of the exemplar folder:

    natural at layer P = the share of the random images whose pattern lies at least as far
                         from their mean as the picture's does (1: typical, 0: beyond all)
    trust              = natural, averaged over the layers before the unit

Plain pixel-space images, which reach a unit the adversarial way, score clearly lower than the
fourier recipe's on the same units (bench/RESULTS.md). Beside it, `agreement` says how much the
picture's pattern points where its exemplars' do, against chance (1: as much as an exemplar
does, 0: as much as a random image), averaged over the layers where the exemplars share a
direction. Both need exemplars (`--exemplars DIR`). The activations are computed on the
workers, in chunks of images, like the exemplar pass; the results are stored in the unit's
exemplar record with the unit key they were computed for, so they are redone only when the
picture or the exemplars change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from atlas.exemplars import decode, fit_settings
from atlas.layers import capture, deepest, run_forward
from atlas.optim.device import resolve_device
from atlas.optim.fold import running_module

RANDOM_IMAGES = 64  # folder images: half set each layer's mean, half what chance agreement is
RANDOM_SEED = 0
TRUST_VERSION = 2  # 2: naturalness along the main path; a record of another version is redone
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
    images, kept = decode(task.blobs, *fit_settings(model))
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


def naturalness(picture: np.ndarray, randoms: np.ndarray) -> float:
    """The share of `randoms` [N, C] at least as far from their mean as `picture` [C] is, in
    units of each channel's spread over them."""
    mean, spread = randoms.mean(0), randoms.std(0) + 1e-6
    distances = np.linalg.norm((randoms - mean) / spread, axis=1)
    return float(np.mean(distances >= np.linalg.norm((picture - mean) / spread)))


def agreement(picture: np.ndarray, exemplars: np.ndarray, randoms: np.ndarray) -> float | None:
    """How much `picture` points where `exemplars` [K, C] do (both centred on random images),
    from 0 (as much as a random image) to 1 (as much as an exemplar does); None when there are
    fewer than two exemplars or they share no direction."""
    if len(exemplars) < 2:
        return None
    # half the random images set the mean, the other half what chance agreement is: compared
    # with the images that set it, anything would look a little like anything else
    mean, baseline = randoms[::2].mean(0), randoms[1::2]
    found = exemplars - mean
    total = found.sum(0)
    centroid = total / len(found)
    # each exemplar against the others' centroid, so that none is compared with itself
    typical = np.mean([_cos(e, (total - e) / (len(found) - 1)) for e in found])
    chance = np.mean([_cos(r - mean, centroid) for r in baseline])
    if typical - chance < MIN_SPREAD:
        return None
    return (_cos(picture - mean, centroid) - chance) / (typical - chance)


def trust_score(
    picture: dict[str, np.ndarray],
    exemplars: list[dict[str, np.ndarray]],
    randoms: list[dict[str, np.ndarray]],
) -> dict:
    """{"score", "layers" ([layer, naturalness] in the order of `picture`), "agreement"} (see
    the module's docstring); score and agreement are None where no layer can say."""
    natural, agreed = {}, []
    for layer in picture:
        pool = np.stack([r[layer] for r in randoms])
        natural[layer] = round(naturalness(picture[layer], pool), 4)
        found = np.stack([e[layer] for e in exemplars]) if exemplars else np.zeros((0, 1))
        if (value := agreement(picture[layer], found, pool)) is not None:
            agreed.append(value)
    score = round(float(np.mean(list(natural.values()))), 4) if natural else None
    together = round(float(np.clip(np.mean(agreed), 0, 1)), 4) if agreed else None
    layers = [[layer, value] for layer, value in natural.items()]
    return {"score": score, "layers": layers, "agreement": together}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 0.0
