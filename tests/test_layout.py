"""Layer layouts: channels-last maps and patch tokens are read as (C, H, W) maps everywhere."""

import pytest
import torch
from torch import nn

from atlas.exemplars import _best_of_chunk, patch_box
from atlas.layers import capture, resolve, run_forward
from atlas.layout import Layout, Producer, layout_of
from atlas.models import InputNormalization, LoadedModel
from atlas.optim import Target, get, visualize
from atlas.optim.objectives import BatchObjective

CONV, LINEAR = Producer(96, False), Producer(96, True)


@pytest.mark.parametrize(
    ("shape", "producer", "size", "expected"),
    [
        ((96, 56, 56), CONV, 224, Layout("map")),
        ((56, 56, 96), LINEAR, 224, Layout("channels_last")),  # a Swin stage
        ((56, 56, 384), LINEAR, 224, Layout("channels_last")),  # inside a ConvNeXt block
        ((96, 56, 56), LINEAR, 224, Layout("map")),  # after ConvNeXt's permute back
        ((64, 49, 64), LINEAR, 224, None),  # MaxViT's 64 windows of 7x7: not an image grid
        ((197, 768), LINEAR, 224, Layout("tokens", 1, (14, 14))),  # ViT-B/16: class + 14x14
        ((196, 768), LINEAR, 224, Layout("tokens", 0, (14, 14))),
        ((261, 384), LINEAR, 224, Layout("tokens", 5, (16, 16))),  # class + 4 registers
        ((64, 147, 147), CONV, 299, Layout("map")),  # InceptionV3: 299 -> 149 -> 147
        ((16, 16, 16), Producer(16, False), 32, Layout("map")),  # both fit: the conv decides
        ((16, 16, 16), Producer(16, True), 32, Layout("channels_last")),
        ((10,), None, 224, Layout("vector")),
        ((3, 230, 230), None, 224, Layout("map")),  # padding makes a map larger than the input
        ((8, 448, 448), CONV, 224, Layout("map")),  # so does upsampling
        ((21, 64), LINEAR, 32, Layout("tokens", 5, (4, 4))),  # class + 4 registers, not 4x5
        ((512, 196), Producer(196, True), 224, None),  # an MLP-Mixer's token mixing
    ],
)
def test_layout_is_read_from_the_grid_and_the_producing_module(shape, producer, size, expected):
    assert layout_of(shape, producer, (size, size)) == expected


class ChannelsLast(nn.Module):
    """conv (8 channels, 8x8) -> permute to N x H x W x C -> linear 8 -> 6 on the last axis."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mix = nn.Linear(8, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.mix(self.conv(x).permute(0, 2, 3, 1))  # N x 8 x 8 x 6
        return self.head(x.mean((1, 2)))


class TinyViT(nn.Module):
    """4 px patches of a 16 px image (a 4x4 grid) plus a class token, then a token MLP."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.block = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = self.block(torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1))
        return self.head(tokens[:, 0])


def wrap(module: nn.Module, size: int) -> LoadedModel:
    return LoadedModel("test", module, InputNormalization((1.0,) * 3, (0.0,) * 3), (size, size))


@pytest.fixture(scope="module")
def channels_last():
    return wrap(ChannelsLast(), 16)


@pytest.fixture(scope="module")
def vit():
    return wrap(TinyViT(), 16)


def raw_output(model, name, images):
    found = {}
    module = dict(model.module.named_modules())[name]
    handle = module.register_forward_hook(lambda _m, _i, out: found.setdefault(name, out))
    try:
        with torch.no_grad():
            model.module(model.normalize(images))
    finally:
        handle.remove()
    return found[name]


def test_channels_last_layers_are_read_channels_first(channels_last):
    mix = resolve(channels_last, "mix")
    assert (mix.kind, mix.shape, mix.channels) == ("channels_last", (6, 8, 8), 6)
    assert resolve(channels_last, "conv").kind == "map"
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), capture(channels_last, ["mix"]) as acts:
        run_forward(channels_last.module, channels_last.normalize(images))
    assert torch.equal(acts["mix"], raw_output(channels_last, "mix", images).permute(0, 3, 1, 2))


def test_a_channel_objective_on_a_channels_last_layer_raises_that_channel(channels_last):
    recipe = get("plain", steps=12, size=16, lr=0.05)
    targets = [Target("mix", "channel", 3), Target("mix", "channel", 0)]
    results = visualize(channels_last, targets, recipe, seed=0)
    means = []  # per image: each channel's mean over positions, channels on the last axis
    for result in results:
        image = torch.from_numpy(result.image).permute(2, 0, 1)[None].float() / 255
        means.append(raw_output(channels_last, "mix", image)[0].mean((0, 1)))
    assert means[0][3] > means[1][3] and means[1][0] > means[0][0]
    # what was reported is channel 3's mean over positions, not row 3 of a misread map
    assert results[0].activation == pytest.approx(means[0][3].item(), abs=0.05)


def test_token_layers_are_their_patch_grid_and_the_class_token_a_layer(vit):
    block = resolve(vit, "block")
    assert (block.kind, block.prefix, block.shape) == ("tokens", 1, (6, 4, 4))
    cls = resolve(vit, "block.cls")
    assert (cls.kind, cls.shape, cls.module) == ("cls_token", (6,), "block")
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), capture(vit, ["block", "block.cls"]) as acts:
        run_forward(vit.module, vit.normalize(images))
    raw = raw_output(vit, "block", images)
    assert torch.equal(acts["block"], raw[:, 1:].transpose(1, 2).reshape(2, 6, 4, 4))
    assert torch.equal(acts["block.cls"], raw[:, 0])
    # a neuron is one patch: row 1, column 2 is token 1 + 1 * 4 + 2
    objective = BatchObjective([Target("block", "neuron", 5, position=(1, 2)).__add__(0)])
    assert objective(acts)[0] == pytest.approx(raw[0, 1 + 6, 5].item())


def test_exemplar_boxes_land_on_the_patch_that_fires(vit):
    images = torch.zeros(3, 3, 16, 16)
    spots = [(0, 3), (2, 1), (3, 3)]  # the patch (row, column) that is bright in each image
    for image, (row, col) in zip(images, spots, strict=True):
        image[:, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] = 1.0
    embed = vit.module.embed
    # channel 0 of the patch embedding responds to brightness, so it peaks on the bright patch
    with torch.no_grad():
        embed.weight[0] = 1.0
        embed.bias[0] = 0.0
    with torch.no_grad(), capture(vit, ["embed", "block"]) as acts:
        run_forward(vit.module, vit.normalize(images))
    found = _best_of_chunk(acts["embed"], [0], torch.arange(3), top=3)
    by_image = {
        int(i): (int(r), int(c))
        for i, r, c in zip(*(found[k][:, 0] for k in ("ids", "rows", "cols")), strict=True)
    }
    assert by_image == dict(enumerate(spots))
    left, top, right, bottom = patch_box(2, 1, (4, 4), 2.0, (16, 16))
    assert (left, top, right, bottom) == (4, 8, 8, 12)  # the input pixels of patch (2, 1)


class FoldsWindowsIntoTheBatch(nn.Module):
    """Attention over 4 windows of 4x4 tokens, run as a batch of 4 (as Swin codes do)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.attend = nn.Linear(6, 6)

    def forward(self, x):
        maps = self.embed(x)  # N x 6 x 8 x 8
        windows = maps.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(-1, 16, 6)
        return self.attend(windows).reshape(len(x), -1).mean(1, keepdim=True)


def test_outputs_with_windows_folded_into_the_batch_are_no_layers():
    names = [layer.name for layer in wrap(FoldsWindowsIntoTheBatch(), 16).layers]
    assert names == ["embed", "logits"]  # not `attend`, whose 4 rows are windows of one image


class SquareBlock(nn.Module):
    """A ConvNeXt-like block whose output is 16 channels of 16x16: both readings fit, and the
    last module to run is a Linear, though the block returns its map channels first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.mix = nn.Linear(16, 16)

    def forward(self, x):
        return self.mix(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SquareOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = SquareBlock()
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.block(x).mean((2, 3)))


def test_when_both_readings_fit_a_taller_input_shows_which_axis_is_the_height():
    kinds = {layer.name: layer.kind for layer in wrap(SquareOutput(), 32).layers}
    assert kinds["block.mix"] == "channels_last"  # the Linear's own output, 16x16x16
    assert kinds["block"] == "map"  # permuted back: the Linear ran last, but the map is NCHW
