"""A layer's activations over an image folder: C-dim vectors at sampled positions, bounded.

Concepts and activation atlases are learned from these vectors. Each image contributes at most
`per_image` positions of the layer's map (a token layer's patch grid; its class and register
tokens are not part of the map), drawn from a random stream seeded by (seed, image id), so
which positions an image gives does not depend on the chunks or the order they run in. The
total is capped before any work starts: at most `max_vectors` vectors and `max_bytes` of
float32 (64 MiB by default); a folder too large for the cap gives fewer positions per image,
then a seeded subset of its images. Each vector keeps its image id and (row, column), so that
exemplar patches and where-it-fires maps can be derived from it.

The work is split like the exemplar pass (atlas.exemplars, whose folder listing, fingerprint,
file reading and decoding it reuses): `Collection.tasks()` yields chunks of image bytes,
`sample_task` runs one on a worker, `Collection.add` merges its result on the client.
`collect` does all of it in this process.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atlas.exemplars import CHUNK_IMAGES, decode, fingerprint, fit_settings, list_images, read_blobs
from atlas.files import read_arrays, write_arrays
from atlas.layers import capture, resolve, run_forward
from atlas.optim.device import resolve_device
from atlas.optim.fold import running_module

SAMPLES_VERSION = "2"  # 2: images shown as the model's preprocessing shows them (crop, resize)


@dataclass(frozen=True)
class Sampling:
    """How many vectors to take from a folder, and the seed that picks them."""

    per_image: int = 16
    max_vectors: int = 65_536
    max_bytes: int = 64 * 2**20  # float32 vectors: wide layers get fewer of them
    seed: int = 0

    def cap(self, channels: int) -> int:
        """The most vectors of `channels` floats that the collection may hold."""
        return max(1, min(self.max_vectors, self.max_bytes // (4 * channels)))

    def sizes(self, channels: int, spots: int, images: int) -> tuple[int, int]:
        """(positions per image, images used) for a folder of `images` and a map of `spots`
        positions: what the collection will hold, known before any image is read."""
        cap = self.cap(channels)
        return max(1, min(self.per_image, spots, cap // images)), min(images, cap)


def samples_key(identity: str, source: str, folder_print: str, sampling: Sampling) -> str:
    """What decides the vectors: the model's identity (weights and preprocessing), what the
    layer reads (atlas.layers.LayerInfo.source), the folder's fingerprint and the sampling
    settings."""
    fields = [identity, source, folder_print, list(vars(sampling).values()), SAMPLES_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def positions(image_id: int, count: int, height: int, width: int, seed: int) -> np.ndarray:
    """The flat map positions image `image_id` gives: `count` of them without repeats."""
    rng = np.random.default_rng([seed, image_id])
    return np.sort(rng.choice(height * width, size=min(count, height * width), replace=False))


@dataclass(frozen=True)
class SampleTask:
    """A chunk of images (bytes, with their ids in the folder listing) and what to take."""

    ids: tuple[int, ...]
    blobs: tuple[bytes, ...]
    layer: str
    per_image: int
    seed: int

    @property
    def name(self) -> str:
        """How executors name the task: the chunk's first image and a hash of what it asks."""
        asked = f"{self.ids}|{self.layer}|{self.per_image}|{self.seed}".encode()
        return f"samples-{self.ids[0]}-{hashlib.sha256(asked).hexdigest()[:12]}"


def layer_maps(model, layer: str, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The layer's activations [N, C, H, W] (or [N, C]) for images [N, C, H, W] in [0, 1],
    float32, with the forward pass stopped after the layer."""
    module = running_module(model, [layer]).to(device)
    with torch.no_grad(), capture(model, [layer], layer, module) as acts:
        run_forward(module, model.normalize.to(device)(images.to(device)))
    return acts[layer].float()


def sample_task(model, task: SampleTask, device: str | None = None) -> dict:
    """One chunk on a worker: the vectors at each image's positions, their image ids, rows and
    columns, and the ids of the images that did not decode."""
    device = resolve_device(device)
    images, kept = decode(task.blobs, *fit_settings(model))
    result = {"unreadable": [task.ids[p] for p in range(len(task.blobs)) if p not in kept]}
    vectors, ids, rows, cols = [], [], [], []
    if kept:
        acts = layer_maps(model, task.layer, images, device)
        maps = acts if acts.dim() == 4 else acts[:, :, None, None]
        height, width = maps.shape[2:]
        flat = maps.flatten(2).cpu()
        for row, position in enumerate(kept):
            image_id = task.ids[position]
            where = positions(image_id, task.per_image, height, width, task.seed)
            vectors.append(flat[row][:, torch.from_numpy(where)].T.numpy())
            ids.append(np.full(len(where), image_id))
            rows.append(where // width)
            cols.append(where % width)
    result["vectors"] = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    for name, parts in (("images", ids), ("rows", rows), ("cols", cols)):
        result[name] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return result


@dataclass
class Samples:
    """A layer's sampled activation vectors and where each comes from."""

    layer: str
    key: str
    vectors: np.ndarray  # float32 [N, C]
    images: np.ndarray  # int32 [N]: index into `files`
    rows: np.ndarray  # int16 [N]: the position in the layer's map
    cols: np.ndarray  # int16 [N]
    map_size: tuple[int, int]  # the layer's (H, W); (1, 1) for a vector layer
    files: tuple[str, ...]  # the folder's images, relative to it, in listing order
    unreadable: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        return self.vectors.shape[1]

    @property
    def image_count(self) -> int:
        """How many images gave vectors."""
        return len(np.unique(self.images))

    def save(self, path: Path) -> None:
        """One .npz file, written atomically."""
        meta = {"layer": self.layer, "key": self.key, "map_size": list(self.map_size)}
        meta.update(files=list(self.files), unreadable=list(self.unreadable))
        arrays = {"vectors": self.vectors, "images": self.images}
        write_arrays(path, meta, rows=self.rows, cols=self.cols, **arrays)

    @classmethod
    def load(cls, path: Path) -> Samples:
        meta, stored = read_arrays(path)
        arrays = {name: stored[name] for name in ("vectors", "images", "rows", "cols")}
        return cls(
            meta["layer"],
            meta["key"],
            map_size=tuple(meta["map_size"]),
            files=tuple(meta["files"]),
            unreadable=tuple(meta["unreadable"]),
            **arrays,
        )


class Collection:
    """The sampling of one layer over one folder: which images, how many positions each, the
    key of the result; then the merged results of its tasks."""

    def __init__(self, model, layer: str, folder: str | Path, sampling: Sampling = Sampling()):
        info = resolve(model, layer)
        self.layer, self.sampling, self.folder = layer, sampling, Path(folder)
        self.paths = list_images(self.folder)
        self.key = samples_key(
            model.identity, info.source, fingerprint(self.folder, self.paths), sampling
        )
        self.map_size = tuple(info.shape[1:]) if len(info.shape) == 3 else (1, 1)
        spots = self.map_size[0] * self.map_size[1]
        self.per_image, used = sampling.sizes(info.channels, spots, len(self.paths))
        chosen = np.arange(len(self.paths))
        if used < len(self.paths):  # even one position each is too many: a seeded subset
            rng = np.random.default_rng([sampling.seed, len(self.paths)])
            chosen = np.sort(rng.choice(len(self.paths), size=used, replace=False))
        self.chosen = chosen
        self.capacity = len(chosen) * self.per_image
        self.vectors = np.zeros((self.capacity, info.channels), np.float32)
        self.images = np.zeros(self.capacity, np.int32)
        self.rows = np.zeros(self.capacity, np.int16)
        self.cols = np.zeros(self.capacity, np.int16)
        self.filled = np.zeros(self.capacity, bool)
        self.unreadable: set[int] = set()

    def tasks(self, chunk: int = CHUNK_IMAGES) -> Iterator[SampleTask]:
        """Tasks of `chunk` images each, reading the files only when the next is asked for."""
        for first in range(0, len(self.chosen), chunk):
            ids = tuple(int(i) for i in self.chosen[first : first + chunk])
            blobs = read_blobs(self.paths[i] for i in ids)
            yield SampleTask(ids, blobs, self.layer, self.per_image, self.sampling.seed)

    def add(self, result: dict) -> None:
        """Merge one task's result, in whichever order tasks finish: each image has its slot."""
        for image_id in np.unique(result["images"]):
            picked = result["images"] == image_id
            start = int(np.searchsorted(self.chosen, image_id)) * self.per_image
            end = start + int(picked.sum())
            self.vectors[start:end] = result["vectors"][picked]
            self.images[start:end], self.filled[start:end] = image_id, True
            self.rows[start:end] = result["rows"][picked]
            self.cols[start:end] = result["cols"][picked]
        self.unreadable.update(result["unreadable"])

    def samples(self) -> Samples:
        """The merged vectors in (image id, row, column) order; images that did not decode
        leave no gap (closing one copies the arrays)."""
        arrays = [self.vectors, self.images, self.rows, self.cols]
        if not self.filled.all():
            arrays = [array[self.filled] for array in arrays]
        files = tuple(path.relative_to(self.folder).as_posix() for path in self.paths)
        unreadable = tuple(sorted(self.unreadable))
        return Samples(self.layer, self.key, *arrays, self.map_size, files, unreadable)


def collect(
    model,
    layer: str,
    folder: str | Path,
    sampling: Sampling = Sampling(),
    *,
    device: str | None = None,
    chunk: int = CHUNK_IMAGES,
) -> Samples:
    """All of a Collection in this process, one chunk of images in memory at a time."""
    collection = Collection(model, layer, folder, sampling)
    for task in collection.tasks(chunk):
        collection.add(sample_task(model, task, device))
    return collection.samples()
