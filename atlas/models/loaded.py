"""LoadedModel: a model as the engine needs it (the module in eval mode with frozen weights, how
to feed it, its labels) and its identity for content keys: the digest of its weights plus the
preprocessing it is read with, since either changes every picture."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("bilinear", "bicubic", "nearest")  # what torch's interpolate and grid_sample take


class InputNormalization(nn.Module):
    """Maps images in [0, 1] to what the model was trained on: x * scale + shift per channel."""

    def __init__(self, scale: tuple[float, ...], shift: tuple[float, ...]):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1))

    @classmethod
    def mean_std(cls, mean: tuple[float, ...], std: tuple[float, ...]) -> InputNormalization:
        return cls(tuple(1 / s for s in std), tuple(-m / s for m, s in zip(mean, std, strict=True)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


def _rounded(values, digits: int = 6) -> tuple[float, ...]:
    """Six significant digits: equal settings written two ways (1/0.229 in float32 or 64)
    compare and hash equal."""
    return tuple(float(f"{float(v):.{digits}g}") for v in values)


@dataclass(frozen=True)
class Preprocessing:
    """How an image in [0, 1] becomes the model's input: its centre `crop` (a fraction of the
    largest centred region of the input's aspect; timm's crop_pct) resized (`resize`) to
    `size`, in `channels` channels, then x * scale + shift per channel. A normalization that
    is no per-channel affine map is named by `other` (its class and state digest)."""

    scale: tuple[float, ...]
    shift: tuple[float, ...]
    size: tuple[int, int]
    channels: int
    resize: str = "bilinear"
    crop: float = 1.0
    other: str = ""

    @property
    def mean(self) -> tuple[float, ...]:
        return _rounded((-b / a for a, b in zip(self.scale, self.shift, strict=True)), 5)

    @property
    def std(self) -> tuple[float, ...]:
        return _rounded((1 / a for a in self.scale), 5)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self)).encode()).hexdigest()[:12]

    def as_json(self) -> dict:
        """As plan.json and results.json record it: mean and std rather than the affine map."""
        normalization = (
            {"other": self.other} if self.other else {"mean": self.mean, "std": self.std}
        )
        return {
            **normalization,
            "size": list(self.size),
            "channels": self.channels,
            "resize": self.resize,
            "crop": self.crop,
        }

    def describe(self) -> str:
        """One line: `3x224x224, bicubic, crop 0.875, mean 0.485,0.456,0.406 std 0.229,...`."""
        shape = f"{self.channels}x{self.size[0]}x{self.size[1]}"
        crop = f", crop {self.crop:g}" if self.crop != 1 else ""
        numbers = ",".join
        normalization = self.other or (
            f"mean {numbers(f'{m:.4g}' for m in self.mean)} "
            f"std {numbers(f'{s:.4g}' for s in self.std)}"
        )
        return f"{shape}, {self.resize}{crop}, {normalization}"


def affine_of(normalize: nn.Module, channels: int) -> tuple[tuple, tuple] | None:
    """(scale, shift) of a normalization that is a per-channel affine map (InputNormalization,
    torchvision's Normalize, Identity), else None. Others are probed on three images."""
    if isinstance(normalize, InputNormalization):
        scale, shift = normalize.scale.flatten().tolist(), normalize.shift.flatten().tolist()
        return _rounded(scale), _rounded(shift)
    device = next(iter(normalize.buffers()), torch.empty(0)).device
    probe = torch.rand(3, channels, 4, 4, generator=torch.Generator().manual_seed(0))
    probe[0], probe[1] = 0, 1
    try:
        with torch.no_grad():
            out = normalize(probe.to(device)).cpu().float()
    except Exception:  # not a function of the image alone
        return None
    if out.shape != probe.shape:
        return None
    shift, scale = out[0, :, 0, 0], out[1, :, 0, 0] - out[0, :, 0, 0]
    expected = probe * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    if not torch.allclose(out, expected, atol=1e-5, rtol=1e-4):
        return None
    return _rounded(scale.tolist()), _rounded(shift.tolist())


@dataclass
class LoadedModel:
    """Everything the engine needs to know about a model, loaded once per process."""

    spec: str
    module: nn.Module
    normalize: nn.Module
    input_size: tuple[int, int] = (224, 224)
    input_channels: int = 3
    labels: tuple[str, ...] | None = None
    digest: str = ""
    weights: str = ""
    hookable: bool = True  # False for TorchScript: only the logits can be visualized
    default_layers: tuple[str, ...] = ()  # layer globs an atlas shows when none are chosen
    resize: str = "bilinear"  # how an image is resized to the input (RESIZE_MODES)
    crop: float = 1.0  # the centre fraction of a photo the model is shown (timm's crop_pct)
    preprocessing_from: str = ""  # where the preprocessing came from, as `atlas layers` says
    # the preprocessing atlas fed this model before preprocessing was part of unit keys: read
    # with it, the model's identity is its weights digest alone, so those atlases keep their keys
    legacy: Preprocessing | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}: {self.resize!r}")
        self.module.eval()
        for parameter in self.module.parameters():  # ScriptModules lack requires_grad_()
            parameter.requires_grad_(False)
        for submodule in self.module.modules():
            # an in-place activation overwrites the output captured for the layer before it
            if getattr(submodule, "inplace", False) is True:
                submodule.inplace = False
        if not self.digest:
            self.digest = state_digest(self.module)

    @property
    def preprocessing(self) -> Preprocessing:
        affine = affine_of(self.normalize, self.input_channels)
        scale, shift = affine or ((), ())
        other = "" if affine else f"{type(self.normalize).__name__} {state_digest(self.normalize)}"
        size = (int(self.input_size[0]), int(self.input_size[1]))
        return Preprocessing(
            scale, shift, size, self.input_channels, self.resize, float(self.crop), other
        )

    @property
    def identity(self) -> str:
        """What unit keys hold of the model: the weights digest and the preprocessing's (the
        digest alone for the preprocessing atlas used before it was keyed)."""
        preprocessing = self.preprocessing
        if preprocessing == self.legacy:
            return self.digest
        return f"{self.digest}+{preprocessing.digest}"

    def preprocessing_facts(self) -> dict:
        """The preprocessing as plan.json and results.json record it (and the site shows it)."""
        preprocessing = self.preprocessing
        return {
            **preprocessing.as_json(),
            "described": preprocessing.describe(),
            "from": self.preprocessing_from,
        }

    def keep_keys(self) -> LoadedModel:
        """This model, read as it is, keyed as before preprocessing was keyed: for sources
        whose preprocessing atlas chose the same way before."""
        self.legacy = self.preprocessing
        return self

    @cached_property
    def layers(self) -> list:
        """The visualizable layers in execution order (measured once, by a dry forward pass)."""
        from atlas.layers import discover

        return discover(self)


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Random initialization that is the same in every process (the client and each Dask
    worker must build equal weights: workers check the digest), leaving the caller's RNG as
    it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def state_digest(module: nn.Module) -> str:
    """sha256 over parameter and buffer names and bytes: equal weights, equal digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]
