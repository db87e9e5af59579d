"""What a page shows of a concept: its share, its top channels, the exemplar patches where its
coefficient is highest and, on their images, where it fires.

Exemplars come from the sampled vectors (atlas.concepts.samples): the best sample of each
image, best images first, cut as the exemplar pass cuts a channel's (a square patch as wide
as the layer's effective receptive field, centred on the position). Where a concept fires on
an image takes the image's whole map: `firing_maps` runs the model on those images.
"""

from __future__ import annotations

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
    patch_box,
    read_blobs,
    receptive_halfwidth,
)
from atlas.optim.device import resolve_device
from atlas.optim.objectives import Target, direction

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


def firing_maps(
    model,
    layer: str,
    dictionary: Dictionary,
    paths: Sequence[Path],
    device: str | None = None,
) -> np.ndarray:
    """Each concept's coefficient at every position of the layer's map on each image: float32
    [len(paths), K, H, W] (zeros for an image that does not decode)."""
    device = resolve_device(device)
    images, kept = decode(read_blobs(paths), model.input_size, model.input_channels)
    acts = layer_maps(model, layer, images, device)
    maps = acts if acts.dim() == 4 else acts[:, :, None, None]
    count, channels, height, width = maps.shape
    codes = dictionary.encode(maps.permute(0, 2, 3, 1).reshape(-1, channels))
    codes = codes.reshape(count, height, width, -1).permute(0, 3, 1, 2).cpu()
    found = torch.zeros(len(paths), dictionary.size, height, width)
    found[kept] = codes
    return found.numpy()


def patches(
    model, samples: Samples, folder: str | Path, picks: Sequence[Exemplar]
) -> list[np.ndarray | None]:
    """The exemplar patch of each pick (uint8 [112, 112, 3], as the exemplar pass cuts them;
    None for an image changed or removed since it was sampled)."""
    reach = receptive_halfwidth(model, samples.layer)
    cut = []
    for pick in picks:
        box = patch_box(pick.row, pick.col, samples.map_size, reach, model.input_size)
        path = Path(folder) / samples.files[pick.image]
        try:
            cut.append(cut_patch(path, box, model.input_size, model.input_channels))
        except DECODE_ERRORS:
            cut.append(None)
    return cut
