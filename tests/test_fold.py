"""Folding BatchNorm into convolutions: same function, faster, never where it changes a layer."""

import logging

import numpy as np
import torch
from torch import nn

from atlas.models import InputNormalization, LoadedModel
from atlas.optim import channel, get, logit, visualize
from atlas.optim.fold import conv_bn_pairs, running_module

QUICK = get("fourier", steps=10, size=32)


class SamePadConv(nn.Conv2d):
    """A TF-"same" convolution as efficientnet-lite builds it: a ZeroPad2d child, no padding."""

    def __init__(self, cin: int, cout: int, pad: tuple[int, int, int, int], **kwargs):
        super().__init__(cin, cout, 3, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class BatchNormNet(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> pool -> fc. With `leak`, conv2's output
    also feeds the classifier directly, so folding bn2 into conv2 would change the logits."""

    def __init__(self, leak: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = SamePadConv(3, 8, (1, 1, 1, 1))
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = SamePadConv(8, 12, (0, 1, 0, 1), stride=2)
        self.bn2 = nn.BatchNorm2d(12)
        self.relu2 = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(12, 5)
        self.leak = leak
        for bn in (self.bn1, self.bn2):  # trained-looking statistics, not the identity
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.relu1(self.bn1(self.conv1(x))))
        z = self.relu2(self.bn2(y))
        return self.fc(self.pool(z + y if self.leak else z))


def bn_model(leak: bool = False) -> LoadedModel:
    return LoadedModel(
        spec="bn-tiny",
        module=BatchNormNet(leak),
        normalize=InputNormalization((2.0,) * 3, (-1.0,) * 3),
        input_size=(32, 32),
        labels=tuple(f"class{i}" for i in range(5)),
    )


def kinds(module: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in module.named_modules() if name}


def test_pairs_are_found_by_following_tensors():
    model = bn_model()
    sample = torch.rand(1, 3, 32, 32)
    assert conv_bn_pairs(model.module, sample) == [("conv1", "bn1"), ("conv2", "bn2")]


def test_the_folded_copy_computes_the_same_function_with_fewer_ops():
    model = bn_model()
    folded = running_module(model, ["relu2"])
    assert folded is not model.module
    names = kinds(folded)
    assert "BatchNorm2d" not in names.values()
    assert names["conv1"] == "Conv2d" and names["conv1"] != kinds(model.module)["conv1"]
    assert names["conv2"] == "SamePadConv"  # asymmetric "same" padding stays a separate op
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(folded(x), model.module(x), rtol=1e-4, atol=1e-5)
    assert "BatchNorm2d" in kinds(model.module).values()  # the original is untouched
    assert running_module(model, ["bn1", "logits"]) is folded  # one copy serves every layer


def test_a_hooked_convolution_keeps_its_batchnorm():
    model = bn_model()
    copy = running_module(model, ["conv2"])
    names = kinds(copy)
    assert names["bn2"] == "BatchNorm2d" and names["bn1"] == "Identity"
    inside = running_module(model, ["conv1.static_padding"])
    assert kinds(inside)["conv1.static_padding"] == "ZeroPad2d"


def test_a_copy_that_changes_the_function_is_not_used(caplog):
    model = bn_model(leak=True)
    with caplog.at_level(logging.WARNING):
        assert running_module(model, ["logits"]) is model.module
    assert "folding BatchNorm changed its outputs" in caplog.text


def test_visualize_gives_what_the_unfolded_model_gives(monkeypatch):
    model = bn_model()
    targets = [channel("relu2", 3), logit(1)]
    folded = visualize(model, targets, QUICK, seed=2)
    monkeypatch.setattr("atlas.optim.loop.running_module", lambda m, hooked, **_: m.module)
    plain = visualize(model, targets, QUICK, seed=2)
    for a, b in zip(folded, plain, strict=True):
        np.testing.assert_allclose(a.history, b.history, rtol=1e-3, atol=1e-3)
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 2


def test_only_the_latest_copy_is_kept():
    model = bn_model()
    first = running_module(model, ["conv1"])
    second = running_module(model, ["conv2"])
    assert first is not second
    assert running_module(model, ["conv2"]) is second
    assert running_module(model, ["conv1"]) is not first  # rebuilt, the old one was dropped


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d layout: torch's batch norm, then its children drop and act."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class ScaledNorm(nn.BatchNorm2d):
    """A BatchNorm subclass of unknown layout: its own forward, a child of its own."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gate(x)


def norm_act_model(norm: type) -> LoadedModel:
    model = bn_model()
    model.module.bn1 = norm(8).eval()
    model.module.bn2 = norm(12).eval()
    return LoadedModel("norm-act", model.module, model.normalize, input_size=(32, 32))


def test_a_norm_with_its_activation_inside_folds_and_keeps_it_by_name():
    model = norm_act_model(NormAct)
    assert {layer.name for layer in model.layers} >= {"bn1", "bn1.act", "bn2.act"}
    folded = running_module(model, ["bn1.act", "relu2"])  # the crash of timm's models before
    assert kinds(folded)["bn1"] == "FoldedNorm" and kinds(folded)["bn1.act"] == "SiLU"
    [result] = visualize(model, [channel("bn1.act", 2)], QUICK)
    assert np.isfinite(result.objective_best)


def test_a_norm_of_unknown_layout_stays_unfolded_and_runs():
    model = norm_act_model(ScaledNorm)
    assert running_module(model, ["relu2"]) is model.module
    [result] = visualize(model, [channel("bn1", 1)], QUICK)
    assert np.isfinite(result.objective_best)


def test_only_the_planned_layers_are_compared(caplog):
    model = bn_model(leak=True)  # folding bn2 changes the logits, not relu1
    with caplog.at_level(logging.WARNING):
        assert running_module(model, ["relu1"], with_logits=False) is not model.module
    assert caplog.text == ""
    assert running_module(model, ["relu1"]) is model.module  # with the logits it differs


def test_a_copy_that_cannot_be_made_runs_the_model_as_it_is(monkeypatch, caplog):
    monkeypatch.setattr("atlas.optim.fold.fold_batchnorm", lambda *_: {}["no such layer"])
    model = bn_model()
    with caplog.at_level(logging.WARNING):
        assert running_module(model, ["relu2"]) is model.module
    assert "BatchNorm not folded (KeyError" in caplog.text
