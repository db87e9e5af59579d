"""Tiny models for fast tests. Importable as the model spec `tinymodels:tiny` by Dask worker
processes started with tests/ on their PYTHONPATH."""

import dataclasses

import torch
from torch import nn

from atlas.models import InputNormalization, LoadedModel


class TinyNet(nn.Module):
    """conv1 -> relu1 -> conv2 -> relu2 -> conv3 -> pool -> fc: 10 classes."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(self.conv3(x)))


def tiny_model(in_channels: int = 3, size: int = 32) -> LoadedModel:
    return LoadedModel(
        spec="tiny",
        module=TinyNet(in_channels),
        normalize=InputNormalization((2.0,) * in_channels, (-1.0,) * in_channels),
        input_size=(size, size),
        input_channels=in_channels,
        labels=tuple(f"class{i}" for i in range(10)),
    )


def tiny() -> LoadedModel:
    """The factory behind the spec `tinymodels:tiny`."""
    return tiny_model()


class _FailWhenOptimized(nn.Module):
    """Raises during optimization (gradients on) but not in the dry pass of layer discovery."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("simulated CUDA out of memory")
        return x


def flaky() -> LoadedModel:
    """The tiny model whose conv2 fails whenever it is optimized: conv1 units still work,
    because the forward pass stops before conv2 for them."""
    model = tiny_model()
    model.module.conv2 = nn.Sequential(model.module.conv2, _FailWhenOptimized())
    model.spec = "tinymodels:flaky"
    return model


def tiny_retrained() -> LoadedModel:
    """The tiny model as a later checkpoint in which only conv2's channel 3 changed (its
    filter negated): the one unit of conv2 whose visualization should change."""
    model = tiny_model()
    with torch.no_grad():
        model.module.conv2.weight[3].neg_()
        model.module.conv2.bias[3].neg_()
    return dataclasses.replace(model, spec="tinymodels:tiny_retrained", digest="")


def tiny_grey_wide() -> LoadedModel:
    """A 1-channel tiny model fed 24x40 images whose conv1 channel 0 sums its 3x3 window: it
    fires most where an image is brightest, so its strongest position is known."""
    model = tiny_model(in_channels=1)
    with torch.no_grad():
        model.module.conv1.weight.fill_(0.1)
        model.module.conv1.bias.zero_()
    return dataclasses.replace(
        model, spec="tinymodels:tiny_grey_wide", input_size=(24, 40), digest=""
    )
