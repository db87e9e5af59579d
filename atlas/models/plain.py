"""A plain nn.Module as a LoadedModel, for `package.module:factory` specs and the Python API.

Each setting comes from the first that gives it: the keywords of `wrap`, the module's timm-style
`pretrained_cfg` dict (mean, std, input_size, interpolation, crop_pct: what timm models carry),
then atlas's guesses: as many channels as its first convolution takes, the first of
TRIED_INPUT_SIZES it runs on, ImageNet's mean and std, bilinear resizing of the whole image.
A module read with the guesses alone keeps the unit keys it had before preprocessing was keyed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from atlas.layers import module_device
from atlas.models.loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESIZE_MODES,
    InputNormalization,
    LoadedModel,
    seeded_init,
)

TRIED_INPUT_SIZES = (224, 32, 28, 64, 96, 128, 256, 299)  # ImageNet, CIFAR, MNIST, others


def has_uninitialized_params(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _channel_guesses(module: nn.Module) -> list[int]:
    """The channels a module may take: its first built convolution's, then RGB, then grey."""
    convs = (m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd))
    first = next((m.in_channels for m in convs if not has_uninitialized_params(m)), None)
    return list(dict.fromkeys([c for c in (first, 3, 1) if c]))


def fitting_input(
    module: nn.Module, channels: int | None = None, size: tuple[int, int] | None = None
) -> tuple[int, tuple[int, int]]:
    """(channels, size): the first of the guessed channel counts (or `channels`) and of
    TRIED_INPUT_SIZES (or `size`) that the module runs on (a CIFAR net's flattened classifier
    takes only 32 px), or the first guesses when none does (discovery then says why). Lazy
    modules are tried on copies and built once, at the input found."""
    device = module_device(module)
    lazy = any(has_uninitialized_params(m) for m in module.modules())
    if channels and size and not lazy:
        return channels, size  # told: discovery says so if the module does not run on it
    channel_options = [channels] if channels else _channel_guesses(module)
    sizes = [size] if size else [(s, s) for s in TRIED_INPUT_SIZES]
    for option in channel_options:
        for height, width in sizes:
            trial = copy.deepcopy(module) if lazy else module
            try:
                with torch.no_grad():
                    trial(torch.zeros(1, option, height, width, device=device))
            except Exception:  # a shape error means: not this input
                continue
            if lazy:
                with torch.no_grad(), seeded_init():
                    module(torch.zeros(1, option, height, width, device=device))
            return option, (height, width)
    return channel_options[0], sizes[0]


def imagenet_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std for RGB; for other channel counts, their averages per channel."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return (mean,) * channels, (std,) * channels


def _per_channel(values, channels: int, what: str) -> tuple[float, ...]:
    values = (values,) * channels if isinstance(values, int | float) else tuple(values)
    if len(values) == 1:
        values *= channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values for {channels} channels")
    return tuple(float(v) for v in values)


def _square(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size[-2:]
    return int(height), int(width)


def from_pretrained_cfg(cfg: object) -> dict:
    """The settings a timm-style `pretrained_cfg` gives, as `wrap` keywords."""
    if not isinstance(cfg, dict):
        return {}
    settings: dict = {}
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        settings["mean"], settings["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    if isinstance(size := cfg.get("input_size"), Sequence) and len(size) == 3:
        settings["channels"], settings["input_size"] = int(size[0]), _square(size)
    if cfg.get("interpolation") in RESIZE_MODES:
        settings["resize"] = cfg["interpolation"]
    if isinstance(cfg.get("crop_pct"), int | float):
        settings["crop"] = float(cfg["crop_pct"])
    return settings


def wrap(
    module: nn.Module,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    input_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    resize: str | None = None,
    crop: float | None = None,
    labels: Sequence[str] | None = None,
    spec: str | None = None,
) -> LoadedModel:
    """`module` as a LoadedModel; settings not given come from its `pretrained_cfg`, then from
    atlas's guesses (module docstring). The module is put in eval mode with frozen weights."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch nn.Module, got {type(module).__name__}")
    given = {
        "mean": mean,
        "std": std,
        "input_size": None if input_size is None else _square(input_size),
        "channels": channels,
        "resize": resize,
        "crop": crop,
    }
    cfg = from_pretrained_cfg(getattr(module, "pretrained_cfg", None))
    chosen = {**cfg, **{k: v for k, v in given.items() if v is not None}}
    count, size = fitting_input(module.eval(), chosen.get("channels"), chosen.get("input_size"))
    default_mean, default_std = imagenet_mean_std(count)
    try:
        normalize = InputNormalization.mean_std(
            _per_channel(chosen.get("mean", default_mean), count, "mean"),
            _per_channel(chosen.get("std", default_std), count, "std"),
        )
    except ValueError as error:
        raise ValueError(f"{spec or type(module).__name__}: {error}") from None
    loaded = LoadedModel(
        spec=spec or type(module).__name__,
        module=module,
        normalize=normalize,
        input_size=size,
        input_channels=count,
        labels=tuple(labels) if labels is not None else None,
        resize=chosen.get("resize", "bilinear"),
        crop=chosen.get("crop", 1.0),
        preprocessing_from=describe_origin(cfg, given),
    )
    return loaded if cfg or any(v is not None for v in given.values()) else loaded.keep_keys()


def describe_origin(cfg: dict, given: dict) -> str:
    """Where a wrapped module's preprocessing came from, for `atlas layers`."""
    if any(v is not None for v in given.values()):
        return "set by the caller"
    if cfg:
        return "the module's pretrained_cfg"
    return "atlas's defaults: ImageNet mean/std, the first input size that runs"
