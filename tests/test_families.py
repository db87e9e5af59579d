"""One model of every torchvision family, random weights, small inputs: its layers are read in
their own layout, its default layers are its main path, and a unit of it can be visualized.
The full matrix of every model is bench/models.py (docs/models.md)."""

import dataclasses
import math

import pytest

from atlas import models
from atlas.optim import Target, get, visualize
from atlas.plan import default_layer_patterns

# model, input size, (default layer count, first, last), kinds that must be found
FAMILIES = [
    ("alexnet", 96, (5, "features.1", "features.11"), {"map"}),
    ("convnext_tiny", 64, (8, "features.0", "features.7"), {"map", "channels_last"}),
    ("densenet121", 64, (8, "features.relu0", "features.denseblock4"), {"map"}),
    ("efficientnet_b0", 64, (9, "features.0", "features.8"), {"map"}),
    ("googlenet", 64, (12, "conv1", "inception5b"), {"map"}),
    ("inception_v3", 128, (16, "Conv2d_1a_3x3", "Mixed_7c"), {"map"}),
    ("maxvit_t", 224, (13, "stem.0", "blocks.3.layers.1"), {"map"}),
    ("mnasnet0_5", 64, (10, "layers.2", "layers.16"), {"map"}),
    ("mobilenet_v2", 64, (19, "features.0", "features.18"), {"map"}),
    ("mobilenet_v3_small", 64, (13, "features.0", "features.12"), {"map"}),
    ("regnet_x_400mf", 64, (23, "stem", "trunk_output.block4.block4-11"), {"map"}),
    ("resnet18", 64, (9, "relu", "layer4.1"), {"map"}),
    ("shufflenet_v2_x0_5", 64, (18, "conv1", "conv5"), {"map"}),
    ("squeezenet1_1", 64, (9, "features.1", "features.12"), {"map"}),
    ("swin_t", 64, (8, "features.0", "features.7"), {"map", "channels_last"}),
    ("vgg11", 64, (8, "features.1", "features.19"), {"map"}),
    ("vit_b_32", 224, (13, "conv_proj", "encoder.layers.encoder_layer_11"), {"tokens"}),
]


@pytest.mark.parametrize(("name", "size", "expected", "kinds"), FAMILIES, ids=lambda v: str(v))
def test_family(name, size, expected, kinds):
    loaded = dataclasses.replace(models.load(name, "random"), input_size=(size, size))
    found = {layer.kind for layer in loaded.layers}
    assert kinds <= found, found
    defaults = default_layer_patterns(loaded)
    assert (len(defaults), defaults[0], defaults[-1]) == expected, defaults
    layers = {layer.name: layer for layer in loaded.layers}
    for name_ in defaults:  # every default layer is a map, none a norm or activation repeat
        assert len(layers[name_].shape) == 3 and math.prod(layers[name_].shape[1:]) > 1
    middle = defaults[len(defaults) // 2]
    recipe = get("fourier", steps=2, size=32)
    [result] = visualize(loaded, [Target(middle, "channel", 0)], recipe, seed=0)
    assert result.image.shape == (32, 32, 3)
    assert math.isfinite(result.objective_best)
