"""Tiny models for fast tests. Importable as the model spec `tinymodels:tiny` by Dask worker
processes started with tests/ on their PYTHONPATH."""

import dataclasses
import os
import time

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


class _Gate(nn.Module):
    """Holds every optimization step (gradients on) while the file that ATLAS_TEST_GATE names
    exists, and says so by touching that name + '.held': a test decides when tasks may finish
    (after a worker job is cancelled or has hit its walltime, say), using no CPU meanwhile."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = os.environ.get("ATLAS_TEST_GATE")
        if gate and torch.is_grad_enabled() and x.requires_grad and os.path.exists(gate):
            open(f"{gate}.held", "a").close()
            while os.path.exists(gate):
                time.sleep(0.05)
        return x


def gated() -> LoadedModel:
    """The tiny model whose conv2 waits at the gate (conv1 units never reach it)."""
    model = tiny_model()
    model.module.conv2 = nn.Sequential(model.module.conv2, _Gate())
    model.spec = "tinymodels:gated"
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


class _Residual(nn.Module):
    """x + ReLU6(conv(x)): its output is not the clamp's, so it is read as it is."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.conv(x))


class ClampedNet(nn.Module):
    """stem (conv, BatchNorm, ReLU6) -> block (residual) -> head (conv, ReLU6) -> pool -> fc,
    the shape of EfficientNet-Lite's saturating stem and head; the convolutions are scaled up
    so that an optimized image drives the head past the clamp within a few dozen steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = _Residual(8)
        self.head = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU6())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(12, 10)
        with torch.no_grad():
            for conv in (self.stem[0], self.block.conv, self.head[0]):
                conv.weight.mul_(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.head(self.block(self.stem(x)))))


def tiny_clamped() -> LoadedModel:
    return dataclasses.replace(
        tiny_model(), module=ClampedNet(), spec="tinymodels:tiny_clamped", digest=""
    )


def tiny_small() -> LoadedModel:
    """The tiny model fed 12x12 images: conv3's map is 3x3 (for position-by-position growth)."""
    return dataclasses.replace(tiny_model(size=12), spec="tinymodels:tiny_small", digest="")


class PlantedNet(nn.Module):
    """A known circuit: mix.0 copies feat.0, mix.1 is minus feat.0, mix.2 copies feat.2, and
    the head reads class 0 = +mix.0, class 1 = -mix.0, class 2 = +mix.2 (class 3 nothing).
    feat.0 has a bias of 1, so it is positive on every image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.mix = nn.Conv2d(4, 3, 1, bias=False)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.feat[0].weight[0] *= 0.1
            self.feat[0].bias[0] = 1.0
            self.mix.weight.zero_()
            self.mix.weight[0, 0] = 1.0
            self.mix.weight[1, 0] = -1.0
            self.mix.weight[2, 2] = 1.0
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 0, 1.0], [0, 0, 0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.mix(self.feat(x))))


def planted() -> LoadedModel:
    """The factory behind `tinymodels:planted`."""
    return LoadedModel(
        spec="planted",
        module=PlantedNet(),
        normalize=InputNormalization((2.0,) * 3, (-1.0,) * 3),
        input_size=(16, 16),
        labels=("up", "down", "other", "none"),
    )
