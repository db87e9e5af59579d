"""The exemplar records of concepts and activation-atlas cells (atlas.learning): each one's best
sampled positions (a concept's by its coefficient, one per image; a cell's members nearest its
mean: atlas.concepts), cut as the exemplar pass cuts a channel's, and where it fires on each of
those images: its coefficient (a concept) or its direction objective (a cell) over the image's
whole map, measured by `firing_task` on the workers and drawn over the image as the model sees
it, with the patch's box. Each is stored as the unit's exemplar record (OUT/exemplars/
<layer>~concepts/<index>.json, an item's "map" beside its "image"), which the site shows and
the trust pass reads as it does a channel's; the exemplar pass leaves these units alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from atlas import exemplars
from atlas.analysis import colour_ramp
from atlas.concepts.describe import EXEMPLARS, Exemplar, FiringTask, describe, firing_task, patches
from atlas.concepts.samples import Samples
from atlas.files import atomic_write_bytes, encode_image
from atlas.plan import Learned, LearnedLayer
from atlas.record import split_layer

if TYPE_CHECKING:
    from atlas.execute import Executor
    from atlas.learning import Learning, LearningSummary

LEARNED_EXEMPLAR_VERSION = "1"
OVERLAY = 0.6  # how much of the firing map's colour covers the image


def exemplar_key(samples_key: str, unit: Learned) -> str:
    """What decides a concept's or a cell's exemplars: the samples (model, layer, folder), the
    dictionary or atlas it belongs to and its direction."""
    fields = [samples_key, unit.source_key, unit.direction.digest, EXEMPLARS]
    fields.append(LEARNED_EXEMPLAR_VERSION)
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def outdated(learning: Learning, learned: Sequence[LearnedLayer]) -> list[tuple]:
    """(learned layer, index, unit, key) of every concept and cell whose exemplar record is
    missing, damaged or of another key."""
    stored = learning.store.exemplars()
    todo = []
    for made in learned:
        for index, unit in made.units:
            key = exemplar_key(learning.keys[made.of], unit)
            if stored.get((made.name, index), {}).get("key") != key:
                todo.append((made, index, unit, key))
    return todo


def write_exemplars(
    learning: Learning, todo: list[tuple], pool: Executor, summary: LearningSummary
) -> None:
    """Every record of `todo` (outdated's), one learned layer at a time; a layer whose maps
    failed is named in `summary` and left for the next run."""
    for made in dict.fromkeys(made for made, *_ in todo):
        wanted = [(index, key) for other, index, _, key in todo if other is made]
        samples = learning.samples(learning.infos[made.of], pool, summary=summary)
        if samples is None:
            continue
        dictionary, atlas = learning.current(made.of)
        if split_layer(made.name)[1] == "concepts":  # read as its dictionary's coefficient k
            described = describe(samples, dictionary)
            picks = [described[index].exemplars for index, _ in wanted]
            readers = [index for index, _ in wanted]
            make = partial(FiringTask, made.of, dictionary=dictionary)
        else:  # read as its mean's direction objective: row `reader` of the task's means
            cells = {cell.row * atlas.size + cell.col: cell for cell in atlas.cells}
            picks = [cells[index].exemplars(samples) for index, _ in wanted]
            readers = list(range(len(wanted)))
            means = np.array([cells[index].mean for index, _ in wanted], np.float32)
            make = partial(FiringTask, made.of, means=means)
        maps, failures = _firing(learning, samples, make, picks, readers, pool)
        if failures:
            summary.failures += [f"where the units of {made.name} fire: {failures[0]}"]
            continue
        for (index, key), chosen, reader in zip(wanted, picks, readers, strict=True):
            found = [maps.get((pick.image, reader)) for pick in chosen]
            _write_record(learning, made.name, index, key, samples, chosen, found)
            summary.exemplars += 1


def _firing(
    learning: Learning,
    samples: Samples,
    make: Callable[..., FiringTask],
    picks: list[list[Exemplar]],
    readers: list[int],
    pool: Executor,
) -> tuple[dict[tuple[int, int], np.ndarray], list[str]]:
    """Where each unit fires on its exemplars' images, measured on `pool` by tasks of
    CHUNK_IMAGES images (`make(ids, blobs, units)`): {(image, reader): map}, and the errors
    of the tasks that failed."""
    asked: dict[int, list[int]] = {}
    for chosen, reader in zip(picks, readers, strict=True):
        for pick in chosen:
            asked.setdefault(pick.image, []).append(reader)
    maps: dict[tuple[int, int], np.ndarray] = {}
    failures = []
    for outcome in pool.map(firing_task, _chunks(learning, samples, make, asked)):
        if outcome.error is not None:
            failures.append(outcome.error)
            continue
        task = outcome.task
        for image, units, found in zip(task.ids, task.units, outcome.result["maps"], strict=True):
            if found is not None:
                maps.update(((image, unit), found[row]) for row, unit in enumerate(units))
    return maps, failures


def _chunks(
    learning: Learning,
    samples: Samples,
    make: Callable[..., FiringTask],
    asked: dict[int, list[int]],
) -> Iterator[FiringTask]:
    """The tasks, reading each chunk's files only when the executor asks for it."""
    images = sorted(asked)
    for first in range(0, len(images), exemplars.CHUNK_IMAGES):
        ids = tuple(images[first : first + exemplars.CHUNK_IMAGES])
        blobs = exemplars.read_blobs(learning.folder / samples.files[i] for i in ids)
        yield make(ids, blobs, tuple(tuple(asked[i]) for i in ids))


def _write_record(
    learning: Learning,
    layer: str,
    index: int,
    key: str,
    samples: Samples,
    picks: list[Exemplar],
    maps: list[np.ndarray | None],
) -> None:
    """The unit's patches and firing pictures, then its exemplar record (the store removes
    the files of the record before it). One colour scale for all of its maps: from 0 to the
    highest value on any of them."""
    store, model = learning.store, learning.model
    high = max([float(np.max(m)) for m in maps if m is not None] + [1e-6])
    items = []
    for rank, ((box, patch), pick, found) in enumerate(
        zip(patches(model, samples, learning.folder, picks), picks, maps, strict=True)
    ):
        if patch is None:  # changed or removed since it was sampled
            continue
        path = store.exemplar_path(layer, index, f".{key[:8]}.{rank}.webp")
        atomic_write_bytes(path, encode_image(patch, quality=85))
        item = {
            "image": path.relative_to(store.out).as_posix(),
            "source": samples.files[pick.image],
            "score": round(pick.score, 5),
            "box": [round(edge, 1) for edge in box],
        }
        if found is not None:
            source = learning.folder / samples.files[pick.image]
            picture, size = firing_picture(model, source, found, high, box)
            path = store.exemplar_path(layer, index, f".{key[:8]}.{rank}.map.webp")
            atomic_write_bytes(path, picture)
            item.update(map=path.relative_to(store.out).as_posix(), map_size=list(size))
        items.append(item)
    record = {"layer": layer, "index": index, "key": key, "digest": model.digest}
    store.save_exemplars({**record, "items": items})


def firing_picture(
    model, path, found: np.ndarray, high: float, box: Sequence[float]
) -> tuple[bytes, tuple[int, int]]:
    """The image as the model sees it, PATCH_PX on its longer side, under the map's colours
    (dark low, bright high; values under 0 as 0), with the exemplar patch's box drawn in
    white; WebP bytes and (width, height)."""
    height, width = model.input_size
    scale = exemplars.PATCH_PX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    with Image.open(path) as image:
        shown = exemplars.fit(*(image, *exemplars.fit_settings(model)))
        shown = shown.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    level = np.clip(np.nan_to_num(found.astype(np.float32)) / high, 0, 1)
    heat = Image.fromarray(colour_ramp(level)).resize(size, Image.Resampling.BILINEAR)
    picture = Image.blend(shown, heat, OVERLAY)
    ImageDraw.Draw(picture).rectangle([edge * scale for edge in box], outline=(255, 255, 255))
    return encode_image(np.asarray(picture), quality=85), size
