"""Recipes: every hyperparameter of a visualization in one frozen, hashable value.

`recipe.hash` goes into task keys, so two runs with equal recipes share results and any change
of a setting reruns exactly the units it affects. Presets are in `PRESETS`; `get(name, **over)`
returns one with overrides applied and checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from itertools import accumulate

from atlas.errors import AtlasError, did_you_mean


@dataclass(frozen=True)
class Octave:
    """One stage of progressive upscaling: a share of the steps at a fraction of the size,
    with learning rate and blur sigma moving linearly from start to end."""

    share: float
    scale: float
    lr: tuple[float, float]
    blur: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Stage:
    """What the engine runs: `steps` steps at `size` px."""

    steps: int
    size: int
    lr: tuple[float, float]
    blur: tuple[float, float]


OPTIMIZERS = ("adam", "nadam")
SCHEDULES = ("constant", "cosine")
# the names of atlas.optim.param's registries, spelled here so that recipes (and the CLI's
# option parsing) need no torch; tests/test_optim_param.py keeps them in step
PARAMETERIZATIONS = ("fourier", "pixel", "phase")
SQUASH_NAMES = ("sigmoid", "clip")


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    steps: int = 512
    size: int = 128  # optimized image, resized to the model's input for every forward pass
    lr: float = 0.05
    param: str = "fourier"  # fourier | pixel | phase (fixed 1/f^decay magnitude, as MACO)
    decay: float = 1.0  # Fourier spectrum scaled by 1 / f^decay
    colour: str | tuple[float, ...] = "imagenet"  # imagenet | none | 9 floats (3x3 matrix)
    squash: str = "sigmoid"  # sigmoid | clip
    init_noise: float = 0.01  # sd of the starting noise (pixels: around grey; Fourier: spectrum;
    # phase: unused, phases start uniform)
    # Geometric transforms, drawn per image and step; pixels are at 128 px and scale with size.
    pad: float = 0.0
    jitter: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    rotate: float = 0.0  # degrees, +-
    colour_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # b, c, s, hue
    # Priors on the image, subtracted from the objective.
    l1: float = 0.0  # weight of mean |x - 0.5|
    l2: float = 0.0  # weight of mean (x - 0.5)^2
    tv: float = 0.0  # weight of total variation (mean absolute neighbour difference)
    blur_every: int = 0  # blur the image every N steps (0: never)
    blur_sigma: float = 0.0
    octaves: tuple[Octave, ...] = ()
    diversity: float = 0.0  # weight of the diversity term for K images of one unit
    diversity_layer: str | None = None  # default: the unit's own layer
    redirect_relu: int = 8  # first steps in which dead ReLUs pass gradient (atlas.optim.relu)
    # Settings added after atlases were first stored: at their defaults they stay out of the
    # hash, so adding them reran nothing.
    optimizer: str = field(default="adam", metadata={"hashed_if_changed": True})  # | nadam
    contrast: float = field(default=1.0, metadata={"hashed_if_changed": True})  # phase: sd
    # transformed views of each image per step, their objectives averaged: N views cost N images
    views: int = field(default=1, metadata={"hashed_if_changed": True})
    # learning rate over the whole run: a linear warm-up over this share of the steps, then
    # constant, or a cosine decay to 0 at the last step; multiplies the octaves' own lr
    warmup: float = field(default=0.0, metadata={"hashed_if_changed": True})
    schedule: str = field(default="constant", metadata={"hashed_if_changed": True})  # | cosine

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be at least 1"),
            (8 <= self.size <= 4096, "size must be between 8 and 4096 px"),
            (self.lr > 0, "lr must be positive"),
            (
                self.param in PARAMETERIZATIONS,
                f"param must be one of {', '.join(PARAMETERIZATIONS)}",
            ),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (1 <= self.views <= 64, "views must be between 1 and 64"),
            (0 <= self.warmup < 1, "warmup must be a share of the steps, 0 <= warmup < 1"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (math.isfinite(self.contrast) and self.contrast > 0, "contrast must be positive"),
            (
                self.param == "phase" or self.contrast == 1.0,
                "contrast applies to param = phase only",
            ),
            (
                self.param != "phase" or not (self.blur_every or self.octaves),
                "a phase image cannot be blurred or upscaled (its magnitude is fixed): "
                "drop blur_every and octaves",
            ),
            (self.squash in SQUASH_NAMES, f"squash must be one of {', '.join(SQUASH_NAMES)}"),
            (
                self.colour in ("imagenet", "none")
                or (isinstance(self.colour, tuple) and len(self.colour) == 9),
                "colour must be imagenet, none or 9 numbers",
            ),
            (self.scale[0] > 0 and self.scale[0] <= self.scale[1], "scale must be 0 < lo <= hi"),
            (min(self.pad, self.jitter, self.rotate) >= 0, "pad, jitter, rotate must be >= 0"),
            (min(self.l1, self.l2, self.tv, self.diversity) >= 0, "weights must be >= 0"),
            (self.blur_every >= 0 and self.blur_sigma >= 0, "blur settings must be >= 0"),
            (self.redirect_relu >= 0, "redirect_relu must be 0 (never) or a number of steps"),
        ]
        for ok, message in checks:
            if not ok:
                raise AtlasError(f"recipe {self.name}: {message}")

    @property
    def hash(self) -> str:
        """Digest of every setting but the name: renaming a recipe does not rerun anything."""
        settings = dataclasses.asdict(self)
        settings.pop("name")
        for setting in dataclasses.fields(self):
            late = setting.metadata.get("hashed_if_changed")
            if late and settings[setting.name] == setting.default:
                settings.pop(setting.name)
        text = json.dumps(settings, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def has_geometric_transforms(self) -> bool:
        return bool(self.pad or self.jitter or self.rotate or self.scale != (1.0, 1.0))

    def stages(self) -> list[Stage]:
        """The schedule: one stage, or one per octave (steps and sizes follow steps and size).
        Their steps always add up to `steps`, so `steps` is the total everywhere."""
        if not self.octaves:
            return [Stage(self.steps, self.size, (self.lr, self.lr), (self.blur_sigma,) * 2)]
        total_share = sum(o.share for o in self.octaves)
        shares = [octave.share / total_share for octave in self.octaves]
        counts = [round(self.steps * share) for share in shares[:-1]]
        if sum(counts) > self.steps - 1:
            # rounded one by one, they would use up the steps before the last (largest) octave:
            # round the octaves' boundaries instead, so the steps add up and the last one runs
            bounds = [min(round(self.steps * c), self.steps - 1) for c in accumulate(shares[:-1])]
            counts = [end - start for start, end in zip([0, *bounds[:-1]], bounds, strict=True)]
        counts.append(self.steps - sum(counts))
        return [
            Stage(steps, max(8, round(self.size * octave.scale)), octave.lr, octave.blur)
            for steps, octave in zip(counts, self.octaves, strict=True)
            if steps > 0
        ]

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier of the learning rate at `step` (0-based) of `steps`."""
        ramp = round(self.warmup * self.steps)
        if step < ramp:
            return (step + 1) / (ramp + 1)
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(self.steps - 1 - ramp, 1)))
        return 1.0

    def replace(self, **overrides) -> Recipe:
        """A copy with some settings changed; unknown names raise AtlasError."""
        fields = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in fields:
                raise AtlasError(f"unknown recipe setting {key!r}{did_you_mean(key, fields)}")
        return dataclasses.replace(self, **overrides)


_LUCID_TRANSFORMS = dict(pad=12.0, jitter=8.0, scale=(0.9, 1.1), rotate=10.0)

# Lucid's standard (Fourier spectrum, decorrelated colour, sigmoid, transforms) with four
# changes measured on drawn ImageNet classes and Lite0 channels (bench/RESULTS.md, issue 13):
# zooming in up to 1.6x (Lucid's scale is 0.9-1.1) made class images recognizable to other
# models (Lite2's mean p 0.46 -> 0.85 at up to 2x); a 1/f^1.15 spectrum and NAdam took back the
# noise and channel strength the zoom cost (1/f^1.25 blew out highlights); a 192 px canvas
# (was 128) drove channels 13% harder and more than halved the noise of the picture seen at
# 128 px, at a lower trust score (0.32 -> 0.28); 224 and 288 px added 2-4% to the channels, not
# to transfer, for 1.4x and 2.3x the pixels.
_FOURIER = Recipe(
    name="fourier",
    size=192,
    decay=1.15,
    optimizer="nadam",
    **{**_LUCID_TRANSFORMS, "scale": (0.9, 1.6)},
)

PRESETS: dict[str, Recipe] = {
    # Raw gradient ascent on pixels from grey: the baseline that yields adversarial noise.
    "plain": Recipe(name="plain", param="pixel", colour="none", lr=0.05, redirect_relu=0),
    # Pixels with transforms, an L2 pull towards grey and a blur every 10 steps.
    "blur-l2": Recipe(
        name="blur-l2",
        param="pixel",
        colour="none",
        lr=0.05,
        l2=0.05,
        blur_every=10,
        blur_sigma=1.0,
        **_LUCID_TRANSFORMS,
    ),
    # Progressive upscaling: start at half size and grow, blurring at each upscale.
    "octaves": Recipe(
        name="octaves",
        param="pixel",
        colour="imagenet",
        lr=0.05,
        blur_every=4,
        octaves=(
            Octave(share=1, scale=0.5, lr=(0.08, 0.06), blur=(1.0, 0.5)),
            Octave(share=1, scale=0.75, lr=(0.06, 0.04), blur=(0.8, 0.4)),
            Octave(share=1, scale=1.0, lr=(0.04, 0.02), blur=(0.5, 0.2)),
        ),
        **_LUCID_TRANSFORMS,
    ),
    # A steeper 1/f^1.5 spectrum scored better on transfer and high frequencies but blew out
    # 13% of pixel values to black or white (bench/RESULTS.md, image quality); 1/f^1.25 with
    # the zoom still clipped 2.3%, 1/f^1.15 0.2-0.5%.
    "fourier": _FOURIER,
    # The default at a quarter of its steps: at 128 steps its class images are recognized
    # about as well as at 256, and better than Lucent's at 512 (bench/RESULTS.md).
    "fast": _FOURIER.replace(name="fast", steps=128),
    # MACO: only the phase of a 1/f spectrum is optimized, from random phases, with NAdam;
    # Lucid's transforms. The published lr 1.0 scored far lower on Lite0 than 0.1
    # (bench/RESULTS.md), which still trails `fourier` there: this is for deeper models.
    "maco": Recipe(name="maco", param="phase", optimizer="nadam", lr=0.1, **_LUCID_TRANSFORMS),
}
DEFAULT = "fourier"
# Diversity weight used for K > 1 images of a unit unless one is given: on EfficientNet-Lite0
# (blocks.8, 96 steps) 2 left three images alike, 20 made them differ in scale and colour.
DEFAULT_DIVERSITY = 10.0


def get(name: str = DEFAULT, **overrides) -> Recipe:
    """A preset by name, with overrides (None values are ignored, so CLI flags pass through)."""
    if name not in PRESETS:
        raise AtlasError(f"unknown recipe {name!r}{did_you_mean(name, PRESETS)}")
    return PRESETS[name].replace(**{k: v for k, v in overrides.items() if v is not None})


MAX_TIMELAPSE_FRAMES = 130  # per image: 512 steps every 4, kept on the device as 8-bit frames


def check_timelapse(recipe: Recipe, every: int) -> None:
    """A timelapse keeps its frames on the device, so their number is bounded."""
    if every < 0:
        raise AtlasError("timelapse must be 0 (off) or a number of steps")
    total = recipe.steps
    frames = len(range(0, total, every)) + ((total - 1) % every != 0) if every else 0
    if frames > MAX_TIMELAPSE_FRAMES:
        fewest = -(-total // (MAX_TIMELAPSE_FRAMES - 1))
        raise AtlasError(
            f"a timelapse every {every} steps keeps {frames} frames of each image over "
            f"{total} steps; at most {MAX_TIMELAPSE_FRAMES}: choose {fewest} or more"
        )
