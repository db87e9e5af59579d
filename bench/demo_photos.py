"""Photos for `make demo`'s dataset exemplars: seeded random crops of scikit-image's sample photos.

    .venv/bin/python bench/demo_photos.py OUT_DIR [--count 300] [--seed 0] [--size 256]

The Makefile runs it once to give the demo atlas a folder for `atlas run --exemplars`. It sits in
bench/ (next to quality.py, which crops the same photos) because the design card fixes the top
level; it is a helper script, never imported by atlas. Only photos that ship inside
scikit-image's wheel are used, so it works offline; one that does not load (a build without
its data, or one that would need a download) is skipped and named. Each crop is a square of
30-100% of its photo's short side, resized to `size` px and saved as JPEG (crop-000.jpg, ...),
taking the photos in turn. The same seed and photos give the same bytes. OUT_DIR is replaced
as a whole: the crops are written to a sibling folder that is renamed into place at the end,
so an interrupted run leaves no half folder for make to take as done."""

from __future__ import annotations

import argparse
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _stereo(side: int) -> Callable[[], np.ndarray]:
    def load():
        import skimage.data

        return skimage.data.stereo_motorcycle()[side]

    return load


def _named(name: str) -> Callable[[], np.ndarray]:
    def load():
        import skimage.data

        return getattr(skimage.data, name)()

    return load


# scikit-image's bundled photographs; grey ones become grey RGB. Drawings, masks and the data
# that needs pooch (skin, lily, eagle, kidney, ...) are left out.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _named("astronaut"),
    "chelsea": _named("chelsea"),
    "coffee": _named("coffee"),
    "rocket": _named("rocket"),
    "motorcycle_left": _stereo(0),
    "motorcycle_right": _stereo(1),
    "hubble_deep_field": _named("hubble_deep_field"),
    "immunohistochemistry": _named("immunohistochemistry"),
    "retina": _named("retina"),
    "camera": _named("camera"),
    "coins": _named("coins"),
    "moon": _named("moon"),
    "brick": _named("brick"),
    "grass": _named("grass"),
    "gravel": _named("gravel"),
}


def load_photos(names=tuple(PHOTOS)) -> tuple[dict[str, Image.Image], list[str]]:
    """The photos that load, as RGB PIL images, and the names of those that do not."""
    photos, skipped = {}, []
    for name in names:
        try:
            pixels = np.asarray(PHOTOS[name]())
        except Exception:  # any reason a sample is missing (no data, needs a download)
            skipped.append(name)
            continue
        photos[name] = Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    return photos, skipped


def crops(photos: dict[str, Image.Image], count: int, seed: int, size: int):
    """`count` JPEG crops as (file name, bytes), taking the photos in turn."""
    rng = np.random.default_rng(seed)
    items = list(photos.values())
    for i in range(count):
        photo = items[i % len(items)]
        width, height = photo.size
        side = int(rng.uniform(0.3, 1.0) * min(width, height))
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        yield f"crop-{i:03d}.jpg", buffer.getvalue()


def write(out: Path, count: int = 300, seed: int = 0, size: int = 256) -> list[str]:
    """Replace the folder `out` with the crops; returns the names of the photos skipped."""
    photos, skipped = load_photos()
    if not photos:
        raise SystemExit("demo_photos: none of scikit-image's sample photos loads")
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, data in crops(photos, count, seed, size):
        (partial / name).write_bytes(data)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    skipped = write(args.out, args.count, args.seed, args.size)
    used = len(PHOTOS) - len(skipped)
    note = f" (skipped, not available offline: {', '.join(skipped)})" if skipped else ""
    print(f"demo_photos: {args.count} crops of {used} photos in {args.out}{note}")


if __name__ == "__main__":
    main()
