"""Dataset exemplars: for every planned unit, the images of a folder that excite it most.

One pass over the images collects every unit's top k at once. The client reads files in
chunks (the executor keeps only a few chunks in flight, so memory stays bounded however large
the folder) and sends their bytes, so remote workers need no access to the folder; a worker
decodes them, runs the model once per chunk with every needed layer hooked, and returns each
unit's best images of the chunk. A channel's score is its mean over the map (the objective its
visualization maximizes, so the two compare); the patch shown is centred on its strongest
position and as large as the layer's effective receptive field. Files that do not decode are
skipped and counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from atlas.errors import AtlasError
from atlas.files import atomic_write_bytes, encode_image
from atlas.layers import capture, deepest, module_device, resolve, run_forward
from atlas.names import LOGITS
from atlas.optim.device import resolve_device
from atlas.optim.fold import running_module
from atlas.progress import Progress
from atlas.store import Store

if TYPE_CHECKING:  # the executor's module imports Dask, which workers need not load for this
    from atlas.execute import Executor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CHUNK_IMAGES = 32  # images per task on a CPU worker; four times as many on a GPU
PATCH_PX = 112  # stored exemplar size
EXEMPLAR_VERSION = "2"  # 2: non-square inputs cropped to their aspect ratio
SAVE_EVERY_SECONDS = 60.0  # how often an unfinished pass saves what it has merged
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted, so that ids are stable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AtlasError(f"exemplar folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AtlasError(f"exemplar folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def fingerprint(folder: Path, files: list[Path]) -> str:
    """Changes when a file is added, removed, resized or touched."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def exemplar_key(identity: str, source: str, index: int, folder_print: str, top: int) -> str:
    """`identity`: the model's (weights and preprocessing); `source`: the LayerInfo.source of
    the unit's layer (what its ranking reads)."""
    fields = [identity, source, index, folder_print, top, EXEMPLAR_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


PIL_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def centre_crop(
    image: Image.Image, input_size: tuple[int, int], crop: float = 1.0
) -> tuple[float, ...]:
    """(left, top, width, height) of the centre `crop` (timm's crop_pct; 1: all) of the
    largest centred region of `image` with the aspect ratio of the model's input: what the
    model is shown, resized."""
    height, width = input_size
    scale = min(image.width / width, image.height / height) * crop
    crop_width, crop_height = width * scale, height * scale
    return (image.width - crop_width) / 2, (image.height - crop_height) / 2, crop_width, crop_height


def fit(
    image: Image.Image,
    input_size: tuple[int, int],
    channels: int,
    resize: str = "bilinear",
    crop: float = 1.0,
) -> Image.Image:
    """`image` as the model sees it: its centre region resized to the input size (with the
    model's resize mode and crop), in the model's colour mode."""
    image = image.convert("L" if channels == 1 else "RGB")
    left, top, width, height = centre_crop(image, input_size, crop)
    box = (left, top, left + width, top + height)
    return image.resize((input_size[1], input_size[0]), PIL_RESAMPLING[resize], box)


# --- the worker's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class ExemplarTask:
    """A chunk of images (their bytes; ids are positions in the sorted folder listing) and,
    per layer, the unit indices whose best images are wanted."""

    first: int
    blobs: tuple[bytes, ...]
    units: tuple[tuple[str, tuple[int, ...]], ...]
    top: int

    @property
    def name(self) -> str:
        """How executors name the task: the chunk's first image and a hash of what it asks."""
        asked = f"{self.first}|{len(self.blobs)}|{self.units}".encode()
        return f"exemplars-{self.first}-{hashlib.sha256(asked).hexdigest()[:12]}"


def decode(
    blobs: Iterable[bytes],
    input_size: tuple[int, int],
    channels: int,
    resize: str = "bilinear",
    crop: float = 1.0,
) -> tuple[torch.Tensor, list[int]]:
    """The decodable images as [N, C, H, W] in [0, 1] as `fit` shows them to the model, and
    their positions in `blobs`."""
    height, width = input_size
    pixels, kept = [], []
    for position, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                image.draft("RGB", (2 * width, 2 * height))  # JPEG: decode at a reduced scale
                shown = fit(image, input_size, channels, resize, crop)
                array = np.asarray(shown, dtype=np.uint8)
        except DECODE_ERRORS:
            continue
        pixels.append(array.reshape(height, width, channels))
        kept.append(position)
    if not pixels:
        return torch.zeros(0, channels, height, width), kept
    stacked = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    return stacked.float() / 255, kept


def view_of(model) -> tuple:
    """`decode`'s arguments after the blobs for `model`: how its preprocessing shows a photo."""
    return model.input_size, model.input_channels, model.resize, model.crop


def exemplar_task(model, task: ExemplarTask, device: str | None = None) -> dict:
    """One chunk: per layer, the best `top` images of the chunk for each unit, as arrays
    [k, units] of scores, image ids and the strongest position (row, column) in the map."""
    device = resolve_device(device)
    images, kept = decode(task.blobs, *view_of(model))
    unreadable = sorted(set(range(len(task.blobs))) - set(kept))
    result = {"first": task.first, "unreadable": unreadable, "layers": {}}
    if not kept:
        return result
    names = [layer for layer, _ in task.units]
    hooked = [name for name in names if name != LOGITS]
    module = running_module(model, hooked).to(device)
    ids = torch.tensor(kept, device=device) + task.first
    with torch.no_grad(), capture(model, hooked, deepest(model, names), module) as acts:
        output = run_forward(module, model.normalize.to(device)(images.to(device)))
        if output is not None:
            acts[LOGITS] = output
        for layer, indices in task.units:
            result["layers"][layer] = _best_of_chunk(acts[layer], list(indices), ids, task.top)
    return result


def _best_of_chunk(act: torch.Tensor, indices: list[int], ids: torch.Tensor, top: int) -> dict:
    act = act.float()[:, indices]
    if act.dim() == 4:
        flat = act.flatten(2)
        scores, peak = flat.mean(2), flat.argmax(2)
        rows, cols = peak // act.shape[3], peak % act.shape[3]
    else:
        scores = act
        rows = cols = torch.zeros_like(act, dtype=torch.long)
    values, order = scores.topk(min(top, scores.shape[0]), dim=0)
    return {
        "scores": values.cpu().numpy(),
        "ids": ids[order].cpu().numpy(),
        "rows": rows.gather(0, order).cpu().numpy(),
        "cols": cols.gather(0, order).cpu().numpy(),
    }


# --- the client's side -----------------------------------------------------------------------


class TopK:
    """Each unit's best `top` (score, image id, row, column) so far, merged chunk by chunk;
    ties go to the lower image id, so the result does not depend on the order chunks finish."""

    FIELDS = ("scores", "ids", "rows", "cols")

    def __init__(self, top: int):
        self.top = top
        self.best: dict[str, dict[str, np.ndarray]] = {}

    def merge(self, layers: dict[str, dict]) -> None:
        for layer, found in layers.items():
            old = self.best.get(layer)
            both = {f: np.concatenate([old[f], found[f]]) for f in self.FIELDS} if old else found
            order = np.lexsort((both["ids"], -both["scores"]), axis=0)[: self.top]
            self.best[layer] = {f: np.take_along_axis(both[f], order, 0) for f in self.FIELDS}

    def as_json(self) -> dict:
        return {
            layer: {f: v.tolist() for f, v in best.items()} for layer, best in self.best.items()
        }

    @classmethod
    def from_json(cls, top: int, saved: dict) -> TopK:
        merged = cls(top)
        merged.best = {
            layer: {f: np.asarray(v) for f, v in best.items()} for layer, best in saved.items()
        }
        return merged


def receptive_halfwidth(model, layer: str) -> float:
    """Half the width, in input pixels, of the region that moves a unit in the middle of the
    layer's map (where the input gradient exceeds 2% of its peak): the effective receptive
    field, measured once per layer on a grey image."""
    info = resolve(model, layer)
    size_y, size_x = model.input_size
    largest, smallest = min(model.input_size) / 2, min(model.input_size) / 16
    if len(info.shape) != 3:
        return largest
    module = model.module
    device = module_device(module)
    image = torch.full((1, model.input_channels, *model.input_size), 0.5, device=device)
    image.requires_grad_(True)
    with capture(model, [layer], layer) as acts:
        run_forward(module, model.normalize.to(device)(image))
    height, width = info.shape[1:]
    acts[layer][0, :, height // 2, width // 2].sum().backward()
    strength = image.grad[0].abs().sum(0)
    rows, cols = torch.nonzero(strength > 0.02 * strength.max(), as_tuple=True)
    if rows.numel() == 0:
        return largest
    centre_y = (height // 2 + 0.5) * size_y / height
    centre_x = (width // 2 + 0.5) * size_x / width
    reach = max(
        (rows.float() + 0.5 - centre_y).abs().max().item(),
        (cols.float() + 0.5 - centre_x).abs().max().item(),
    )
    return float(min(max(reach, smallest), largest))


def patch_box(
    row: int, col: int, map_size: tuple[int, int], halfwidth: float, input_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in model-input pixels of the square patch around a map
    position, shifted to stay inside the image."""
    (height, width), (size_y, size_x) = map_size, input_size
    side = min(2 * halfwidth, size_y, size_x)
    centre_y, centre_x = (row + 0.5) * size_y / height, (col + 0.5) * size_x / width
    left = min(max(centre_x - side / 2, 0), size_x - side)
    top = min(max(centre_y - side / 2, 0), size_y - side)
    return left, top, left + side, top + side


def cut_patch(
    path: Path,
    box: tuple[float, ...],
    input_size: tuple[int, int],
    channels: int,
    crop: float = 1.0,
) -> np.ndarray:
    """The patch `box` (model-input pixels) of the image at `path`, cut from the original at
    its full resolution and resized to PATCH_PX."""
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        left, top, width, _ = centre_crop(image, input_size, crop)
        scale = width / input_size[1]
        x0, y0, x1, y1 = box
        source = (left + x0 * scale, top + y0 * scale, left + x1 * scale, top + y1 * scale)
        patch = image.resize((PATCH_PX, PATCH_PX), Image.Resampling.BICUBIC, source)
    return np.asarray(patch.convert("RGB"))


def read_chunks(
    files: list[Path], units: dict[str, list[int]], top: int, chunk: int, skip: set[int]
) -> Iterator[ExemplarTask]:
    """Tasks of `chunk` files each, reading the bytes only when the executor asks for the next
    task. Files that cannot be read become empty blobs (counted as unreadable)."""
    spec = tuple((layer, tuple(indices)) for layer, indices in units.items())
    for first in range(0, len(files), chunk):
        if first in skip:
            continue
        yield ExemplarTask(first, read_blobs(files[first : first + chunk]), spec, top)


def read_blobs(paths: Iterable[Path]) -> tuple[bytes, ...]:
    """Each file's bytes; one that cannot be read is an empty blob (it does not decode)."""
    blobs = []
    for path in paths:
        try:
            blobs.append(Path(path).read_bytes())
        except OSError:
            blobs.append(b"")
    return tuple(blobs)


@dataclass
class ExemplarSummary:
    images: int
    unreadable: int
    units: int  # units whose exemplars were collected in this run
    failures: list[str] = field(default_factory=list)  # chunks that failed: nothing stored


class ExemplarPass:
    """The exemplar work of one run: which units lack current exemplars of the folder, then
    (on an executor) the pass over the images and the stored results."""

    def __init__(self, model, plan_units, folder: str | Path, out: Path, top: int):
        self.model, self.top = model, top
        self.folder = Path(folder)
        self.files = list_images(self.folder)
        self.store = Store(out)
        folder_print = fingerprint(self.folder, self.files)
        stored = self.store.exemplars()
        self.keys: dict[tuple[str, int], str] = {}
        identity = model.identity
        for unit in plan_units:
            if unit.index is None:  # a whole-layer image: no single unit to rank images by
                continue
            source = resolve(model, unit.layer).source
            key = exemplar_key(identity, source, unit.index, folder_print, top)
            if stored.get((unit.layer, unit.index), {}).get("key") != key:
                self.keys[(unit.layer, unit.index)] = key
        self.units: dict[str, list[int]] = {}
        for layer, index in self.keys:
            self.units.setdefault(layer, []).append(index)
        units = sorted(self.units.items())
        text = json.dumps([identity, folder_print, top, units, EXEMPLAR_VERSION])
        self.pass_key = hashlib.sha256(text.encode()).hexdigest()

    @property
    def needed(self) -> bool:
        return bool(self.keys)

    def run(
        self, pool: Executor, on_progress: Callable[[Progress], None] | None = None
    ) -> ExemplarSummary:
        """Every chunk not done by an earlier, interrupted run of this same pass. What has been
        merged is saved every SAVE_EVERY_SECONDS and when a chunk fails, so that a killed or
        failed run resumes where it was; results are stored only once every chunk is done.
        `on_progress` hears after each chunk of the images this run had left to do."""
        saved = self.store.read_exemplar_progress(self.pass_key)
        merged = TopK.from_json(self.top, saved["best"] if saved else {})
        done = set(saved["done"] if saved else [])
        unreadable = set(saved["unreadable"] if saved else [])
        chunk = saved["chunk"] if saved else CHUNK_IMAGES * (1 if pool.device == "cpu" else 4)
        failures = []

        def save() -> None:
            progress = {"pass": self.pass_key, "chunk": chunk, "best": merged.as_json()}
            progress.update(done=sorted(done), unreadable=sorted(unreadable))
            self.store.write_exemplar_progress(progress)

        started = saved_at = time.monotonic()
        total = len(self.files)
        left = total - sum(min(chunk, total - first) for first in done)
        images_done = images_failed = 0
        tasks = read_chunks(self.files, self.units, self.top, chunk, done)
        for outcome in pool.run(exemplar_task, tasks):
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
                if time.monotonic() - saved_at >= SAVE_EVERY_SECONDS:
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

    def _write(self, merged: TopK, unreadable: list[int]) -> None:
        """Patches first, each unit's JSON last, then the folder summary."""
        model, size = self.model, self.model.input_size
        for layer, indices in self.units.items():
            best = merged.best.get(layer)
            shape = resolve(model, layer).shape
            map_size = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
            reach = receptive_halfwidth(model, layer)
            for column, index in enumerate(indices):
                items = []
                key = self.keys[(layer, index)]
                for rank in range(0 if best is None else best["scores"].shape[0]):
                    image_id = int(best["ids"][rank, column])
                    row, col = int(best["rows"][rank, column]), int(best["cols"][rank, column])
                    box = patch_box(row, col, map_size, reach, size)
                    try:
                        patch = cut_patch(
                            self.files[image_id], box, size, model.input_channels, model.crop
                        )
                    except DECODE_ERRORS:  # changed or removed since the pass read it
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
