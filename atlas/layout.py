"""How a layer's output is laid out, so that every consumer sees one (C, H, W) map.

A module's output may be a (C, H, W) map (convolutions), a channels-last (H, W, C) map (Swin
stages, ConvNeXt's inner blocks, which run Linear and LayerNorm on the last axis), or tokens
(T, D) whose patches form a grid (ViT, DeiT), led by class and register tokens. `Layout` turns
any of them into [B, C, H, W] (or [B, C] for vectors and class tokens).

Which axis holds the channels is read from the model, measured in the dry pass of discovery:
a reading is possible only if its positions form a grid of the input's shape (the map of an
image, resampled: a 56x56 grid of a 224 px input, not 56x96 or the 64x49 windows MaxViT
partitions a map into). Where both readings are possible (96x96x96 in ConvNeXt at 384 px), a
second dry pass with a taller input shows which axis is the height; for a model that runs at
one size only, the channels are the axis whose size is the feature count of the last Conv,
BatchNorm, Linear or LayerNorm that ran, on the side that module works on (Conv and
BatchNorm: channels first; Linear and LayerNorm: last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("map", "channels_last", "tokens", "cls_token", "vector")
MAX_PREFIX_TOKENS = 8  # class, distillation and register tokens ahead of the patches


@dataclass(frozen=True)
class Layout:
    """How to read one module output as [B, C, H, W] (maps, tokens) or [B, C] (vectors)."""

    kind: str
    prefix: int = 0  # tokens: leading tokens left out of the patch grid
    grid: tuple[int, int] = (0, 0)  # tokens: the patch grid

    def read(self, output: torch.Tensor) -> torch.Tensor:
        if self.kind == "channels_last":
            return output.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            return output[:, self.prefix :].transpose(1, 2).unflatten(2, self.grid)
        if self.kind == "cls_token":
            return output[:, 0]
        return output

    def scale(self, output: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        """`output` with each image's channels multiplied by `gains` [B, C]: the channels that
        `read` shows, in the module's own layout (tokens outside the grid stay as they are)."""
        if self.kind == "channels_last":
            return output * gains[:, None, None, :]
        if self.kind == "tokens":
            grid = output[:, self.prefix :] * gains[:, None, :]
            return torch.cat([output[:, : self.prefix], grid], dim=1)
        if self.kind == "cls_token":
            return torch.cat([output[:, :1] * gains[:, None, :], output[:, 1:]], dim=1)
        if output.dim() == 4:
            return output * gains[:, :, None, None]
        return output * gains

    def add(self, output: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """`output` plus `delta`, given as `read` shows it ([B, C, H, W] or [B, C]), in the
        module's own layout (tokens outside the grid stay as they are)."""
        if self.kind == "channels_last":
            return output + delta.permute(0, 2, 3, 1)
        if self.kind == "tokens":
            grid = output[:, self.prefix :] + delta.flatten(2).transpose(1, 2)
            return torch.cat([output[:, : self.prefix], grid], dim=1)
        if self.kind == "cls_token":
            return torch.cat([output[:, :1] + delta[:, None], output[:, 1:]], dim=1)
        return output + delta

    def shape(self, raw: tuple[int, ...]) -> tuple[int, ...]:
        """The shape consumers see, from the module's output shape without the batch."""
        if self.kind == "channels_last":
            return (raw[2], raw[0], raw[1])
        if self.kind == "tokens":
            return (raw[1], *self.grid)
        if self.kind == "cls_token":
            return (raw[1],)
        return raw


@dataclass(frozen=True)
class Producer:
    """The last feature-producing module that ran: its feature count and which side it works on."""

    features: int
    channels_last: bool


def producer_of(module: nn.Module) -> Producer | None:
    """The features a Conv, BatchNorm, GroupNorm, Linear or LayerNorm produces, else None."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return Producer(module.out_channels, False)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return Producer(module.num_features, False)
    if isinstance(module, nn.GroupNorm):
        return Producer(module.num_channels, False)
    if isinstance(module, nn.Linear):
        return Producer(module.out_features, True)
    if isinstance(module, nn.LayerNorm) and type(module) is nn.LayerNorm:
        return Producer(module.normalized_shape[-1], True)
    # subclasses such as torchvision's LayerNorm2d permute to normalize the channels of a map
    if isinstance(module, nn.LayerNorm):
        return Producer(module.normalized_shape[-1], False)
    return None


MAX_UPSAMPLING = 4  # maps may be larger than the input (padding, decoders), up to this factor


def is_grid(height: int, width: int, input_size: tuple[int, int]) -> bool:
    """Whether height x width positions can be the input image's grid, resampled: the same
    aspect ratio within rounding (a stride-2 valid convolution takes 299 to 149, then 147)."""
    in_height, in_width = input_size
    if not (1 <= height <= MAX_UPSAMPLING * in_height and 1 <= width <= MAX_UPSAMPLING * in_width):
        return False
    expected = width * in_height / in_width
    return abs(height - expected) <= max(1.0, 0.1 * max(height, expected))


def _is_patch_grid(height: int, width: int, input_size: tuple[int, int]) -> bool:
    """Patches tile the image exactly: the aspect ratio within less than one patch."""
    return abs(height - width * input_size[0] / input_size[1]) < 1


def _patch_grid(tokens: int, input_size: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
    """(prefix, grid) with the fewest leading tokens such that the rest tile the input's shape."""
    in_height, in_width = input_size
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 1) + 1):
        patches = tokens - prefix
        height = round(math.sqrt(patches * in_height / in_width))
        for h in (height - 1, height, height + 1):
            if h >= 1 and patches % h == 0 and _is_patch_grid(h, patches // h, input_size):
                return prefix, (h, patches // h)
    return None


def _readings(shape: tuple[int, ...], input_size: tuple[int, int]) -> list[tuple[Layout, int]]:
    """Each possible layout of an output of `shape`, with its channel count."""
    readings: list[tuple[Layout, int]] = []
    if len(shape) == 3:
        if is_grid(shape[1], shape[2], input_size):
            readings.append((Layout("map"), shape[0]))
        if is_grid(shape[0], shape[1], input_size):
            readings.append((Layout("channels_last"), shape[2]))
    elif len(shape) == 2 and (found := _patch_grid(shape[0], input_size)):
        prefix, grid = found
        readings.append((Layout("tokens", prefix, grid), shape[1]))
    return readings


def is_ambiguous(shape: tuple[int, ...], input_size: tuple[int, int]) -> bool:
    """Whether both a channels-first and a channels-last reading fit (a 96x96x96 output)."""
    return len(_readings(shape, input_size)) == 2


def layout_of(
    shape: tuple[int, ...],
    producer: Producer | None,
    input_size: tuple[int, int],
    taller: tuple[int, ...] | None = None,
) -> Layout | None:
    """How to read an output of `shape` (without the batch), or None when it is no map, token
    sequence or vector (a partition of a map into windows, a 1-d signal). `taller` is the
    same output for a taller input, when measured: the axis that grew is the height."""
    if len(shape) == 1:
        return Layout("vector")
    readings = _readings(shape, input_size)
    if len(readings) == 2 and taller is not None and len(taller) == 3:
        grew = [new > old for old, new in zip(shape, taller, strict=True)]
        height_axis = {"map": 1, "channels_last": 0}
        fitting = [r for r in readings if grew == [i == height_axis[r[0].kind] for i in range(3)]]
        if len(fitting) == 1:
            return fitting[0][0]
    if len(readings) == 2 and producer is not None:
        matching = [r for r in readings if r[1] == producer.features]
        if len(matching) == 1:
            return matching[0][0]
        return readings[1 if producer.channels_last else 0][0]
    return readings[0][0] if readings else None
