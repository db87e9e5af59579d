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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from atlas.errors import AtlasError
from atlas.layers import capture, deepest, module_device, resolve, run_forward
from atlas.optim.device import resolve_device
from atlas.optim.fold import running_module
from atlas.record import LOGITS

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


def fit_settings(model) -> tuple:
    """`decode`'s arguments after the blobs for `model`: how its preprocessing shows a photo."""
    return model.input_size, model.input_channels, model.resize, model.crop


def exemplar_task(model, task: ExemplarTask, device: str | None = None) -> dict:
    """One chunk: per layer, the best `top` images of the chunk for each unit, as arrays
    [k, units] of scores, image ids and the strongest position (row, column) in the map."""
    device = resolve_device(device)
    images, kept = decode(task.blobs, *fit_settings(model))
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
