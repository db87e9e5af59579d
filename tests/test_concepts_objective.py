"""The direction objective: concepts and activation-atlas cells are visualized as directions
over a layer's channels, on every kind of layer."""

import numpy as np
import pytest
import torch
from test_layout import ChannelsLast, TinyViT, wrap
from tinymodels import tiny_model
from torch import nn

from atlas.concepts.samples import layer_maps
from atlas.errors import AtlasError
from atlas.models import InputNormalization, LoadedModel
from atlas.optim import channel, direction, get, visualize
from atlas.optim.objectives import BatchObjective, as_objective


class Loud(nn.Module):
    """Three channels that see one colour each (a 1x1 convolution, then ReLU), channel 0 five
    times louder than the others: independent channels, one of which a picture could raise
    alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.diag(torch.tensor([5.0, 1.0, 1.0]))[:, :, None, None])
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))))


def mean_activations(model, layer: str, images) -> np.ndarray:
    """[N, C]: each image's mean activation vector (uint8 [H, W, 3] or float [N, 3, H, W])."""
    if isinstance(images, list):
        images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return layer_maps(model, layer, images, torch.device("cpu")).mean((2, 3)).numpy()


def test_a_direction_is_raised_more_than_any_one_channel():
    """Each channel's rise and the direction's, in units of their spread over random images:
    a picture that raises the three together raises the direction by more than any channel;
    one that raises one channel alone (the loud one's own picture) raises the direction by
    less than that channel, and fails the same check."""
    model = LoadedModel("loud", Loud(), InputNormalization((2.0,) * 3, (-1.0,) * 3), (16, 16))
    weights = np.full(3, 3**-0.5)
    random = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    natural = mean_activations(model, "act", random)
    spread, along = natural.std(0), (natural @ weights).std()
    recipe = get("plain", steps=48, size=16, redirect_relu=8)
    targets = [direction("act", "mixed", weights), channel("act", 0)]
    (mixed, loud) = [
        np.subtract(*mean_activations(model, "act", [result.image, result.start]))
        for result in visualize(model, targets, recipe, seed=0)
    ]
    assert mixed @ weights / along > (mixed / spread).max()
    assert loud @ weights / along < (loud / spread).max()


def test_the_value_is_the_dot_product_times_the_cosine_to_the_power():
    acts = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # two images of a [B, C] layer
    unit = [1.0, 0.0]
    values = BatchObjective(
        [as_objective(direction("v", "d", unit, power=2)), as_objective(direction("v", "d", unit))]
    )({"v": acts})
    torch.testing.assert_close(values, torch.tensor([3.0 * 0.6**2, 1.0]))
    scaled = BatchObjective([as_objective(direction("v", "d", [5.0, 0.0], power=0))])
    assert scaled({"v": acts}).item() == pytest.approx(3.0)  # weights are made unit-norm


def test_a_direction_at_a_position_reads_only_there():
    acts = torch.zeros(1, 2, 3, 3)
    acts[0, 0, 1, 2] = 2.0
    at = as_objective(direction("m", "d", [1.0, 0.0], position=(1, 2), power=0))
    everywhere = as_objective(direction("m", "d", [1.0, 0.0], power=0))
    values = BatchObjective([at, everywhere])({"m": acts.expand(2, -1, -1, -1)})
    torch.testing.assert_close(values, torch.tensor([2.0, 2.0 / 9]))


@pytest.mark.parametrize(
    ("model", "layer"),
    [
        (tiny_model(), "relu2"),
        (wrap(ChannelsLast(), 16), "mix"),
        (wrap(TinyViT(), 16), "block"),
        (tiny_model(), "fc"),
    ],
    ids=["map", "channels-last", "tokens", "vector"],
)
def test_a_direction_is_raised_on_every_layer_kind(model, layer):
    channels = next(info.channels for info in model.layers if info.name == layer)
    weights = np.random.default_rng(0).normal(size=channels)
    recipe = get("plain", steps=16, size=model.input_size[0])
    (result,) = visualize(model, [direction(layer, "d", weights)], recipe, seed=0)
    assert result.id == f"{layer}:d"
    assert result.objective_best > result.objective_start


def test_ids_keys_and_checks():
    target = direction("blocks.8", "concept3", [0.5, 0.5])
    assert target.id == "blocks.8:concept3"
    assert direction("blocks.8", "cell2-5", [1.0], position=(1, 2)).id == "blocks.8:cell2-5@1,2"
    same = direction("blocks.8", "concept3", [0.5, 0.5])
    assert hash(same) == hash(target) and same.direction.digest == target.direction.digest
    others = [[0.5, 0.25], [0.5, 0.5, 0.0]]
    digests = {direction("blocks.8", "concept3", w).direction.digest for w in others}
    digests.add(direction("blocks.8", "concept3", [0.5, 0.5], power=1).direction.digest)
    assert target.direction.digest not in digests and len(digests) == 3
    assert target.direction.digest[:16] in repr(target)  # short, stable image seeds
    with pytest.raises(AtlasError, match="relu2:d has 3 weights but relu2 has 12 channels"):
        visualize(tiny_model(), [direction("relu2", "d", [1.0, 0.0, 0.0])], get("plain", steps=1))
