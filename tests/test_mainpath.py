"""The main-path rule for default layers, on small models whose answer is known."""

import pytest
import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.mainpath import default_layers
from atlas.models import InputNormalization, LoadedModel


def wrap(module: nn.Module, size: int = 32) -> LoadedModel:
    return LoadedModel("test", module, InputNormalization((1.0,) * 3, (0.0,) * 3), (size, size))


def conv_unit(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + self.bn(self.conv(x))


class Branches(nn.Module):
    """Two branches on one input, concatenated: no chain, so it is shown whole."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_conv_layers_are_shown_after_their_activation_and_never_pooled():
    vgg = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    assert default_layers(wrap(vgg)) == ["1", "4", "6"]


def test_stages_open_into_blocks_and_blocks_stay_whole():
    model = nn.Sequential()
    model.add_module("stem", conv_unit(3, 8, 2))  # one conv unit: shown as `stem`
    model.add_module("stage1", nn.Sequential(Residual(8), Residual(8)))
    model.add_module("mixed", Branches(8))
    model.add_module("stage2", nn.Sequential(Residual(16), Residual(16), Residual(16)))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)))
    # 4 layers at the stage level is fewer than 8: the stages open, the blocks do not
    assert default_layers(wrap(model)) == [
        "stem",
        "stage1.0",
        "stage1.1",
        "mixed",
        "stage2.0",
        "stage2.1",
        "stage2.2",
    ]


def test_a_norm_after_a_block_is_not_shown_again():
    model = nn.Sequential(Residual(3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.Identity())
    model[0].conv = nn.Conv2d(3, 3, 3, padding=1)
    assert default_layers(wrap(model)) == ["0", "2"]


def test_a_lone_convolution_is_shown_after_its_norm():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU()
    )
    assert default_layers(wrap(model)) == ["1", "4"]


class NoGradients(nn.Module):
    """Runs in the dry pass of discovery (no gradients) but fails with gradients on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("cannot resize variables that require grad")
        return self.conv(x)


def test_a_model_that_fails_with_gradients_is_one_clear_error():
    with pytest.raises(AtlasError, match="test failed with gradients on .* RuntimeError: cannot"):
        default_layers(wrap(NoGradients()))
