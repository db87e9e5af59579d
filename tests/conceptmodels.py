"""Tiny models and folders for the concept tests: a layer built from known directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from atlas.models import InputNormalization, LoadedModel

SIZE = 16  # input px; the planted layer's map is 16 x 16


class PlantedDirections(nn.Module):
    """`presence`: K sparse maps of the image (a random 3x3 convolution, a negative bias and
    a ReLU); `mix`: a 1x1 convolution whose weights are the planted directions, so that
    every activation vector of `mix` is a non-negative sum of them."""

    def __init__(self, directions: torch.Tensor):
        super().__init__()
        torch.manual_seed(0)
        planted, channels = directions.shape
        self.presence = nn.Sequential(nn.Conv2d(3, planted, 3, padding=1), nn.ReLU())
        self.mix = nn.Conv2d(planted, channels, 1, bias=False)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, 3)
        with torch.no_grad():
            self.presence[0].bias.fill_(-0.3)
            self.mix.weight.copy_(directions.T[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.mix(self.presence(x))))


def planted_directions(count: int, channels: int, *, signed: bool, seed: int = 0) -> np.ndarray:
    """`count` unit directions over `channels`: Gaussian (signed) or sparse non-negative."""
    rng = np.random.default_rng(seed)
    if signed:
        directions = rng.normal(size=(count, channels))
    else:
        directions = rng.random((count, channels)) * (rng.random((count, channels)) < 0.5)
    return (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)


def planted_model(directions: np.ndarray) -> LoadedModel:
    return LoadedModel(
        spec="planted_directions",
        module=PlantedDirections(torch.from_numpy(directions)),
        normalize=InputNormalization((2.0,) * 3, (-1.0,) * 3),
        input_size=(SIZE, SIZE),
    )


def noise_folder(folder: Path, count: int, size: int = SIZE, seed: int = 0) -> Path:
    """`count` PNGs of uniform colour noise, `size` px square."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"noise{number:04d}.png")
    return folder
