"""What a page shows of a concept: its share, its top channels, the exemplar patches where its
coefficient is highest and, on their images, where it fires.

Exemplars come from the sampled vectors (atlas.concepts.samples): the best sample of each
image, best images first, cut as the exemplar pass cuts a channel's (a square patch as wide
as the layer's effective receptive field, centred on the position). Where a concept (or an
activation-atlas cell) fires on an image takes the image's whole map: `firing_task` runs the
model on those images, on a worker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atlas.concepts.dictionary import Dictionary
from atlas.concepts.samples import Samples, layer_maps
from atlas.exemplars import (
    DECODE_ERRORS,
    cut_patch,
    decode,
    fit_settings,
    patch_box,
    receptive_halfwidth,
)
from atlas.optim.device import resolve_device
from atlas.optim.objectives import Target, direction, direction_values

COSINE_POWER = 2.0  # of direction targets, measured in bench/concepts.py
TOP_CHANNELS = 5
EXEMPLARS = 9


@dataclass(frozen=True)
class Exemplar:
    """One sampled vector shown as a patch: its row in the Samples, the image (an index into
    Samples.files), the position in the layer's map, and its score (a coefficient)."""

    sample: int
    image: int
    row: int
    col: int
    score: float


@dataclass
class Concept:
    """One direction of a layer's dictionary, as a unit of the atlas."""

    layer: str
    index: int
    direction: np.ndarray  # float32 [C], unit norm
    share: float  # atlas.concepts.dictionary: the drop of the layer's share without it
    channels: list[tuple[int, float]]  # the largest weights, by magnitude: (channel, weight)
    exemplars: list[Exemplar]

    @property
    def name(self) -> str:
        return f"concept{self.index}"

    @property
    def id(self) -> str:
        return f"{self.layer}:{self.name}"

    def target(self, power: float = COSINE_POWER) -> Target:
        """The objective its pictures maximize; its id is this concept's."""
        return direction(self.layer, self.name, self.direction.tolist(), power=power)


def top_channels(weights: np.ndarray, count: int = TOP_CHANNELS) -> list[tuple[int, float]]:
    """The `count` channels of largest |weight|, largest first, with their weights."""
    order = np.argsort(-np.abs(weights), kind="stable")[:count]
    return [(int(channel), round(float(weights[channel]), 5)) for channel in order]


def best_samples(
    scores: np.ndarray, samples: Samples, count: int = EXEMPLARS, above: float = 0.0
) -> list[Exemplar]:
    """The highest-scoring sample of each image, for the `count` best images; samples scoring
    `above` or less are left out (a concept absent everywhere has no exemplars)."""
    order = np.lexsort((samples.images, -scores))
    _, first = np.unique(samples.images[order], return_index=True)
    picked = order[np.sort(first)]
    picked = picked[np.argsort(-scores[picked], kind="stable")][:count]
    return [
        Exemplar(
            int(i), int(samples.images[i]), int(samples.rows[i]), int(samples.cols[i]), float(s)
        )
        for i, s in zip(picked, scores[picked], strict=True)
        if s > above
    ]


def describe(
    samples: Samples,
    dictionary: Dictionary,
    *,
    channels: int = TOP_CHANNELS,
    exemplars: int = EXEMPLARS,
) -> list[Concept]:
    """Every concept of the dictionary with its share, top channels and exemplars."""
    codes = dictionary.encode(samples.vectors)
    shares = dictionary.shares(samples.vectors, codes)
    scores = codes.numpy()
    return [
        Concept(
            samples.layer,
            k,
            dictionary.directions[k],
            round(float(shares[k]), 5),
            top_channels(dictionary.directions[k], channels),
            best_samples(scores[:, k], samples, exemplars),
        )
        for k in range(dictionary.size)
    ]


@dataclass(frozen=True, eq=False)
class FiringTask:
    """Images (their bytes, and their ids: indices into Samples.files) and, for each, the
    units whose maps at `layer` are asked: concepts of `dictionary` (their coefficients) or
    activation-atlas cells, rows of `means` (their direction objective, at `power`)."""

    layer: str
    ids: tuple[int, ...]
    blobs: tuple[bytes, ...]
    units: tuple[tuple[int, ...], ...]
    dictionary: Dictionary | None = None
    means: np.ndarray | None = None  # float32 [M, C]
    power: float = COSINE_POWER

    @property
    def name(self) -> str:
        """How executors name the task: the layer, the first image and what it asks."""
        asked = f"{self.layer}|{self.ids}|{self.units}|{self.dictionary is None}".encode()
        return f"firing-{self.ids[0]}-{hashlib.sha256(asked).hexdigest()[:12]}"


def firing_task(model, task: FiringTask, device: str | None = None) -> dict:
    """Where each asked unit fires on its image: float16 [units, H, W] per image (None for
    an image that does not decode), the images shown as the model's preprocessing shows
    them."""
    device = resolve_device(device)
    images, kept = decode(task.blobs, *fit_settings(model))
    maps: list[np.ndarray | None] = [None] * len(task.blobs)
    if not kept:
        return {"maps": maps}
    acts = layer_maps(model, task.layer, images, device)
    acts = acts if acts.dim() == 4 else acts[:, :, None, None]
    height, width = acts.shape[2:]
    for row, position in enumerate(kept):
        units = list(task.units[position])
        if task.dictionary is not None:
            codes = task.dictionary.encode(acts[row].flatten(1).T)  # [H W, K]
            found = codes.T.reshape(-1, height, width)[units]
        else:
            weights = torch.from_numpy(task.means[units]).to(acts.device)
            weights = torch.nn.functional.normalize(weights, dim=1)
            powers = torch.full((len(units),), task.power, device=acts.device)
            found = direction_values(acts[row].expand(len(units), -1, -1, -1), weights, powers)
        maps[position] = found.cpu().numpy().astype(np.float16)
    return {"maps": maps}


def patches(
    model, samples: Samples, folder: str | Path, picks: Sequence[Exemplar]
) -> list[tuple[tuple[float, ...], np.ndarray | None]]:
    """The box (model-input pixels) and exemplar patch of each pick (uint8 [112, 112, 3], as
    the exemplar pass cuts them; None for an image changed or removed since it was
    sampled)."""
    reach = receptive_halfwidth(model, samples.layer)
    cut = []
    for pick in picks:
        box = patch_box(pick.row, pick.col, samples.map_size, reach, model.input_size)
        path = Path(folder) / samples.files[pick.image]
        try:
            patch = cut_patch(path, box, model.input_size, model.input_channels, model.crop)
        except DECODE_ERRORS:
            patch = None
        cut.append((box, patch))
    return cut
