"""The activation atlas of a layer (Carter et al. 2019): its sampled activations laid out in 2D
by UMAP, binned on an N x N grid; each cell with enough vectors is a direction to visualize.

A cell's direction is the mean of its vectors; it keeps its count (icons are sized by it),
its members (nearest to the mean first: its exemplars), the channels that weigh most in its
mean and the concepts nearest to it. UMAP's layout is seeded (umap-learn then runs on one
thread and gives the same layout for the same vectors and seed on one machine); its corners
are stretched to the grid after clipping the outermost 0.5% of points on each axis to it, so
that a few outliers do not squeeze every other vector into a few cells.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlas.concepts.describe import (
    COSINE_POWER,
    EXEMPLARS,
    TOP_CHANNELS,
    Exemplar,
    best_samples,
    top_channels,
)
from atlas.concepts.dictionary import Dictionary
from atlas.concepts.extra import require
from atlas.concepts.samples import Samples
from atlas.errors import AtlasError
from atlas.files import read_arrays, write_arrays
from atlas.optim.objectives import Target, direction

ATLAS_VERSION = "2"  # 2: cells whose mean activation is zero are left out
MIN_COUNT = 3  # cells with fewer vectors are dropped
ZERO = 1e-6  # and cells whose mean activation is no longer than this (a silent region)
NEIGHBOURS = 20  # UMAP's n_neighbors, min_dist and metric as in Carter et al.'s notebooks
MIN_DIST = 0.01
CLIP = 0.5  # per cent of points clipped to the grid's edge on each side of each axis
NEAREST_CONCEPTS = 3


def atlas_key(samples_key: str, size: int, min_count: int, seed: int) -> str:
    """What decides an activation atlas: the sampled vectors (their key) and its settings."""
    fields = [samples_key, size, min_count, seed, ATLAS_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def check_atlas(size: int, layer: str, vectors: int, images: int) -> None:
    """One sentence for a grid that `vectors` sampled from `images` cannot fill: N x N needs
    at least N² vectors (one a cell on average), and more than UMAP's neighbours."""
    if size < 2:
        raise AtlasError(f"an activation atlas needs a grid of at least 2 x 2, not {size} x {size}")
    needed = max(size * size, NEIGHBOURS + 1)
    if vectors < needed:
        per_image = vectors / max(images, 1)
        enough = int(np.ceil(needed / max(per_image, 1e-9)))
        raise AtlasError(
            f"a {size} x {size} activation atlas of {layer} needs at least {needed} "
            f"sampled activations; the exemplar folder gave {vectors} from {images} "
            f"images: use at least {enough} images or a smaller grid"
        )


@dataclass
class Cell:
    """One non-empty cell of the grid, as a unit of the atlas."""

    layer: str
    row: int
    col: int
    count: int
    mean: np.ndarray  # float32 [C]: the mean of its vectors, the direction visualized
    members: np.ndarray  # rows of the Samples, nearest to the mean (cosine) first
    channels: list[tuple[int, float]]  # largest weights of the unit-norm mean
    concepts: list[tuple[int, float]]  # nearest concepts: (index, cosine), nearest first

    @property
    def name(self) -> str:
        return f"cell{self.row}-{self.col}"

    @property
    def id(self) -> str:
        return f"{self.layer}:{self.name}"

    def target(self, power: float = COSINE_POWER) -> Target:
        return direction(self.layer, self.name, self.mean.tolist(), power=power)

    def exemplars(self, samples: Samples, count: int = EXEMPLARS) -> list[Exemplar]:
        """Its members nearest to its mean, one per image; the score is their cosine."""
        vectors = samples.vectors[self.members]
        cosine = _unit(vectors) @ _unit(self.mean[None])[0]
        scores = np.full(len(samples.vectors), -np.inf)
        scores[self.members] = cosine
        return best_samples(scores, samples, count, above=-2.0)


@dataclass
class ActivationAtlas:
    layer: str
    size: int
    min_count: int
    coords: np.ndarray  # float32 [N, 2] in [0, 1]: (y, x) of each sample on the grid
    cells: list[Cell]  # by row, then column
    key: str = ""

    def save(self, path: Path) -> None:
        """One .npz file, written atomically: the layout, and each cell's place, count,
        mean, members, channels and nearest concepts."""
        cells = self.cells
        meta = {"layer": self.layer, "size": self.size, "min_count": self.min_count}
        meta.update(key=self.key, channels=[c.channels for c in cells])
        meta["concepts"] = [c.concepts for c in cells]
        width = len(cells[0].mean) if cells else 0
        write_arrays(
            path,
            meta,
            coords=self.coords,
            places=np.array([(c.row, c.col, c.count) for c in cells], np.int32).reshape(-1, 3),
            means=np.array([c.mean for c in cells], np.float32).reshape(len(cells), width),
            members=np.concatenate([c.members for c in cells]) if cells else np.zeros(0, int),
        )

    @classmethod
    def load(cls, path: Path) -> ActivationAtlas:
        meta, arrays = read_arrays(path)
        coords, places, means = arrays["coords"], arrays["places"], arrays["means"]
        members = np.split(arrays["members"], np.cumsum(places[:, 2])[:-1])
        cells = [
            Cell(
                meta["layer"],
                int(row),
                int(col),
                int(count),
                means[number],
                members[number],
                [tuple(pair) for pair in meta["channels"][number]],
                [tuple(pair) for pair in meta["concepts"][number]],
            )
            for number, (row, col, count) in enumerate(places)
        ]
        return cls(meta["layer"], meta["size"], meta["min_count"], coords, cells, meta["key"])


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def umap_layout(vectors: np.ndarray, seed: int) -> np.ndarray:
    """UMAP of the vectors to 2D (cosine metric), float32 [N, 2]."""
    umap = require("umap", "umap-learn", "activation atlases")
    reducer = umap.UMAP(
        n_neighbors=NEIGHBOURS, min_dist=MIN_DIST, metric="cosine", random_state=seed
    )
    with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": wanted
        warnings.simplefilter("ignore", UserWarning)
        return reducer.fit_transform(vectors).astype(np.float32)


def to_unit_square(layout: np.ndarray) -> np.ndarray:
    """Each axis of a 2D layout stretched to [0, 1], its outermost CLIP% clipped to the edge."""
    low, high = np.percentile(layout, [CLIP, 100 - CLIP], axis=0)
    return ((layout.clip(low, high) - low) / np.maximum(high - low, 1e-12)).astype(np.float32)


def grid_cells(
    samples: Samples,
    coords: np.ndarray,
    size: int,
    min_count: int = MIN_COUNT,
    dictionary: Dictionary | None = None,
) -> list[Cell]:
    """The cells of an N x N grid over `coords` ([N, 2] in [0, 1]) that hold at least
    `min_count` vectors whose mean is not zero."""
    bins = np.minimum((coords * size).astype(int), size - 1)
    flat = bins[:, 0] * size + bins[:, 1]
    cells = []
    for number in np.unique(flat):
        members = np.flatnonzero(flat == number)
        if len(members) < min_count:
            continue
        mean = samples.vectors[members].mean(0)
        if not np.linalg.norm(mean) > ZERO:  # silent activations: no direction to draw
            continue
        cosine = _unit(samples.vectors[members]) @ _unit(mean[None])[0]
        members = members[np.argsort(-cosine, kind="stable")]
        nearest = [] if dictionary is None else nearest_concepts(mean, dictionary)
        unit = _unit(mean[None])[0]
        cells.append(
            Cell(
                samples.layer,
                int(number // size),
                int(number % size),
                len(members),
                mean.astype(np.float32),
                members,
                top_channels(unit, TOP_CHANNELS),
                nearest,
            )
        )
    return cells


def nearest_concepts(mean: np.ndarray, dictionary: Dictionary) -> list[tuple[int, float]]:
    """The NEAREST_CONCEPTS concepts nearest to a cell's mean: (index, cosine), nearest first."""
    similarity = dictionary.directions @ _unit(mean[None])[0]
    order = np.argsort(-similarity, kind="stable")[:NEAREST_CONCEPTS]
    return [(int(k), round(float(similarity[k]), 4)) for k in order]


def activation_atlas(
    samples: Samples,
    size: int,
    *,
    min_count: int = MIN_COUNT,
    seed: int = 0,
    dictionary: Dictionary | None = None,
) -> ActivationAtlas:
    """UMAP of the samples, an N x N grid, and its cells (with their nearest concepts when a
    dictionary of the layer is given)."""
    check_atlas(size, samples.layer, len(samples.vectors), samples.image_count)
    coords = to_unit_square(umap_layout(samples.vectors, seed))
    cells = grid_cells(samples, coords, size, min_count, dictionary)
    key = atlas_key(samples.key, size, min_count, seed)
    return ActivationAtlas(samples.layer, size, min_count, coords, cells, key)
