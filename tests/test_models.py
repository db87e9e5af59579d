"""atlas.models and atlas.layers through their real components: the bundled EfficientNet-Lite0
with its ImageNet weights, torchvision architectures, factories, TorchScript files and layer
discovery on small models built here."""

import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from tinymodels import tiny_clamped
from torch import nn

from atlas import models
from atlas.errors import AtlasError
from atlas.layers import LayerInfo, capture, resolve, run_forward, select
from atlas.models import LoadedModel, state_digest
from atlas.record import LOGITS

# --- the bundled EfficientNet-Lite0 ------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return models.load("efficientnet_lite0")


def chelsea_batch(size):
    """scikit-image's photo of Chelsea the cat as a [1, 3, size, size] batch in [0, 1]."""
    skimage_data = pytest.importorskip("skimage.data")
    pixels = skimage_data.chelsea()
    assert pixels.shape == (300, 451, 3) and pixels.dtype == np.uint8
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    return nn.functional.interpolate(
        image, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


@pytest.mark.integration
def test_lite0_classifies_chelsea_as_an_egyptian_cat(lite0):
    assert lite0.input_size == (224, 224)
    with torch.no_grad():
        logits = lite0.module(lite0.normalize(chelsea_batch(lite0.input_size[0])))
    assert logits.shape == (1, 1000)
    probabilities = logits.softmax(1)[0]
    assert int(probabilities.argmax()) == 285
    assert lite0.labels[285] == "Egyptian cat"
    # Real weights are confident; random ones would give about 1/1000.
    assert float(probabilities[285]) > 0.3


def test_lite0_describes_itself(lite0):
    assert lite0.spec == "efficientnet_lite0"
    assert len(lite0.labels) == 1000
    assert lite0.labels[285] == "Egyptian cat"
    assert lite0.labels[8] == "hen"
    assert (lite0.input_channels, lite0.hookable) == (3, True)
    assert lite0.weights.endswith(".pth")
    assert len(lite0.digest) == 16
    assert int(lite0.digest, 16) >= 0  # hex
    assert not lite0.module.training
    assert not any(p.requires_grad for p in lite0.module.parameters())


def test_lite0_keeps_the_unit_keys_it_had(lite0):
    """Computed on main before preprocessing entered the keys: the atlases of the bundled model
    do not rerun. (A changed recipe preset would change them, as it should.)"""
    from atlas import config
    from atlas.plan import make_plan

    flags = {"layers": ("blocks.8",), "channels": "3", "classes": "285"}
    built = config.build(
        None,
        model="efficientnet_lite0",
        recipe="plain",
        out="unused",
        recipe_overrides={"steps": 17},
        **flags,
    )
    keys = {unit.id: unit.key for unit in make_plan(built, lite0).units}
    assert keys == {
        "blocks.8:3": "ea4f447263f6d62ad78c3174aa54a950d529a983057b73250920abcc9ab4a6c5",
        "logits:285": "925a86391e98ee8aa6c0107b1e309ae65b5f24e373693529e5f3de59ad7184c7",
    }
    assert lite0.identity == lite0.digest
    assert lite0.preprocessing.describe() == (
        "3x224x224, bilinear, mean 0.498,0.498,0.498 std 0.502,0.502,0.502"
    )


def test_lite0_normalization_maps_unit_range_to_minus_one_one(lite0):
    images = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1).expand(1, 3, 3, 1)
    normalized = lite0.normalize(images)[0, :, :, 0]
    expected = torch.tensor([-127 / 128, (0.5 * 255 - 127) / 128, 1.0])
    for channel in range(3):
        torch.testing.assert_close(normalized[channel], expected)


@pytest.mark.integration
def test_lite0_layers_have_readable_names_and_shapes(lite0):
    layers = {layer.name: layer for layer in lite0.layers}
    names = [layer.name for layer in lite0.layers]
    assert names[-1] == LOGITS
    assert layers[LOGITS] == LayerInfo(LOGITS, "output", (1000,), 1000)
    for name in ["stem", "head", "fc", *(f"blocks.{i}" for i in range(16))]:
        assert name in layers
    assert layers["stem"].shape == (32, 112, 112)
    assert layers["blocks.8"].shape == (112, 14, 14)
    assert layers["blocks.8"].channels == 112
    assert layers["head"].shape == (1280, 7, 7)
    # Execution order: stem before every block, blocks in order, head last but logits.
    block_positions = [names.index(f"blocks.{i}") for i in range(16)]
    assert names.index("stem") < block_positions[0]
    assert block_positions == sorted(block_positions)
    assert block_positions[-1] < names.index("head") < names.index("fc")


def test_lite0_digest_is_stable_across_loads(lite0):
    again = models.load("efficientnet_lite0")
    assert again.digest == lite0.digest
    assert again.digest == state_digest(again.module)
    with torch.no_grad():
        again.module.fc.bias[0] += 1.0
    assert state_digest(again.module) != lite0.digest


def test_lite0_digest_changes_with_one_changed_weight(lite0, tmp_path):
    state = torch.load(lite0.weights, map_location="cpu", weights_only=True)
    state["_fc.bias"][3] += 0.5
    path = tmp_path / "lite0-changed.pth"
    torch.save(state, path)
    changed = models.load("efficientnet_lite0", str(path))
    assert changed.weights == str(path)
    assert changed.digest != lite0.digest
    torch.testing.assert_close(changed.module.fc.bias[3], lite0.module.fc.bias[3] + 0.5)


def test_lite0_takes_a_state_dict_saved_from_atlas_s_own_module(lite0, tmp_path):
    """The module that atlas.models.load gives names its layers stem, blocks, head and fc; a
    state dict saved from it (a fine-tuned copy, say) loads as the package's own names do."""
    state = {name: tensor.clone() for name, tensor in lite0.module.state_dict().items()}
    state["fc.bias"][3] += 0.5
    path = tmp_path / "lite0-own-names.pth"
    torch.save(state, path)
    changed = models.load("efficientnet_lite0", str(path))
    assert changed.digest != lite0.digest
    torch.testing.assert_close(changed.module.fc.bias[3], lite0.module.fc.bias[3] + 0.5)


def test_lite0_rejects_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(AtlasError, match="does not fit efficientnet_lite0"):
        models.load("efficientnet_lite0", str(path))


def test_a_checkpoint_with_another_class_count_builds_that_many_classes(tmp_path):
    import torchvision

    path = tmp_path / "ten-classes.pth"
    saved = torchvision.models.resnet18(num_classes=10)
    torch.save(saved.state_dict(), path)
    loaded = models.load("resnet18", str(path))
    assert resolve(loaded, LOGITS).channels == 10
    assert loaded.labels is None  # ImageNet's names would be wrong
    assert loaded.digest == models.state_digest(saved)


def test_weights_with_other_shapes_are_a_clear_error_not_a_traceback(tmp_path):
    import torchvision

    path = tmp_path / "wide.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(AtlasError, match=r"does not fit resnet18: 96 unexpected \(layer1.2.conv1"):
        models.load("resnet18", str(path))


# --- torchvision architectures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet_random():
    return models.load("resnet18", "random")


def test_random_torchvision_weights_are_the_same_in_every_process(resnet_random):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    again = models.load("resnet18", "random")
    assert again.digest == resnet_random.digest
    assert torch.rand(1) == expected  # the caller's random stream is left alone


def test_torchvision_model_with_random_weights(resnet_random):
    assert resnet_random.spec == "resnet18"
    assert resnet_random.weights == "random"
    assert resnet_random.input_size == (224, 224)
    assert len(resnet_random.labels) == 1000
    assert not resnet_random.module.training
    names = [layer.name for layer in resnet_random.layers]
    assert names[-1] == LOGITS and resnet_random.layers[-1].channels == 1000
    layers = {layer.name: layer for layer in resnet_random.layers}
    assert layers["layer4"].shape == (512, 7, 7)
    assert layers["layer1.0.conv1"].shape == (64, 56, 56)
    assert names.index("layer1") < names.index("layer2") < names.index("layer4")


def test_torchvision_state_dict_file_gives_the_saved_digest(resnet_random, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet_random.module.state_dict(), path)
    loaded = models.load("resnet18", str(path))
    assert loaded.weights == str(path)
    assert loaded.digest == resnet_random.digest


def test_torchvision_wrapped_checkpoint_with_dataparallel_prefix(resnet_random, tmp_path):
    state = {f"module.{k}": v for k, v in resnet_random.module.state_dict().items()}
    path = tmp_path / "checkpoint.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert models.load("resnet18", str(path)).digest == resnet_random.digest


def test_torchvision_pretrained_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(AtlasError, match="does not download") as raised:
        models.load("resnet18")
    assert "IMAGENET1K_V1" in str(raised.value) and "--weights random" in str(raised.value)
    assert not (tmp_path / "hub").exists()


def test_torchvision_models_keep_the_keys_of_their_weights_digest(resnet_random):
    """Read as atlas read them before preprocessing was keyed: their atlases do not rerun."""
    assert resnet_random.identity == resnet_random.digest
    assert resnet_random.preprocessing.describe() == (
        "3x224x224, bilinear, mean 0.485,0.456,0.406 std 0.229,0.224,0.225"
    )


def test_a_whole_pickled_model_is_named_with_the_fix(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "whole.pt"
    torch.save(small_classifier(), path)
    for args in (("resnet18", str(path)), (str(path), None)):
        with pytest.raises(AtlasError, match="holds a whole pickled model") as raised:
            models.load(*args)
        assert "torch.nn.modules.container.Sequential" in str(raised.value)
        assert "torch.save(model.state_dict(), path)" in str(raised.value)


def test_torchvision_unknown_weights_name_lists_the_real_ones():
    with pytest.raises(AtlasError, match="IMAGENET1K_V1"):
        models.load("resnet18", "IMAGENET1K_V9")


def test_unknown_model_suggests_close_names():
    with pytest.raises(AtlasError, match="unknown model 'resnet5'") as raised:
        models.load("resnet5")
    assert "resnet50" in str(raised.value)
    with pytest.raises(AtlasError) as raised:
        models.load("efficientnet_lite")
    assert "efficientnet_lite0" in str(raised.value)


# --- package.module:factory --------------------------------------------------------------------

FACTORIES = """
from torch import nn

from atlas.models import InputNormalization, LoadedModel


def rgb():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7)
    )


def grey():
    module = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    )
    return LoadedModel(
        spec="overwritten",
        module=module,
        normalize=InputNormalization.mean_std((0.5,), (0.25,)),
        input_size=(32, 24),
        input_channels=1,
        labels=("zero", "one", "two"),
    )


def number():
    return 42


def plain_grey():  # a plain module whose first conv takes one channel
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(1), nn.LazyLinear(5))


def multispectral():
    return nn.Sequential(nn.Conv2d(13, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def cifar():  # runs on 32 px only: its Linear takes the flattened 5x5 map
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10),
    )


def failing():
    return {}["no such key"]


def lazy_cifar():  # lazy layers: their sizes come from the first input (or a weights file)
    return nn.Sequential(
        nn.LazyConv2d(6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(10),
        nn.Linear(10, 4),
    )


class HeadFirst(nn.Module):  # registers its 32-channel classifier conv before its grey stem
    def __init__(self):
        super().__init__()
        self.classify = nn.Conv2d(32, 5, 1)
        self.stem = nn.Conv2d(1, 32, 3)

    def forward(self, x):
        return self.classify(self.stem(x)).mean((2, 3))


def head_first():
    return HeadFirst()
"""


@pytest.fixture
def factories(importable):
    """The name of a fresh importable module holding the factories above."""
    return importable(FACTORIES)


def test_factory_returning_a_module_gets_imagenet_defaults(factories):
    loaded = models.load(f"{factories}:rgb")
    assert loaded.spec == f"{factories}:rgb"
    assert (loaded.input_size, loaded.input_channels, loaded.labels) == ((224, 224), 3, None)
    assert loaded.hookable and not loaded.module.training
    layers = {layer.name: layer for layer in loaded.layers}
    assert layers["0"].shape == (4, 222, 222)
    assert layers[LOGITS].channels == 7
    # ImageNet normalization: the mean colour maps to zero.
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded.normalize(mean), torch.zeros(1, 3, 1, 1))


def test_factory_returning_a_loaded_model_keeps_its_settings(factories):
    loaded = models.load(f"{factories}:grey")
    assert loaded.spec == f"{factories}:grey"
    assert loaded.input_size == (32, 24)
    assert loaded.input_channels == 1
    assert loaded.labels == ("zero", "one", "two")
    assert loaded.digest == state_digest(loaded.module)
    layers = [(layer.name, layer.shape) for layer in loaded.layers]
    assert layers == [
        ("0", (2, 16, 12)),
        ("1", (2, 16, 12)),
        ("2", (2, 1, 1)),
        ("3", (2,)),
        ("4", (3,)),
        (LOGITS, (3,)),
    ]
    torch.testing.assert_close(loaded.normalize(torch.full((1, 1, 1, 1), 0.75)).item(), 1.0)


def test_factory_with_a_weights_file(factories, tmp_path):
    source = models.load(f"{factories}:rgb")
    assert models.load(f"{factories}:rgb").digest == source.digest  # seeded: same everywhere
    state = {name: tensor + 1 for name, tensor in source.module.state_dict().items()}
    path = tmp_path / "rgb.pt"
    torch.save(state, path)
    loaded = models.load(f"{factories}:rgb", str(path))  # the factory's init, then the file
    assert loaded.weights == str(path)
    assert loaded.digest != source.digest
    assert loaded.digest == models.state_digest(loaded.module)
    torch.testing.assert_close(loaded.module.state_dict()["0.bias"], state["0.bias"])


def test_factory_inputs_are_inferred_from_the_first_convolution_and_a_size_that_runs(factories):
    grey = models.load(f"{factories}:plain_grey")
    assert grey.input_channels == 1
    torch.testing.assert_close(grey.normalize(torch.full((1, 1, 1, 1), 0.449)).item(), 0.0)
    assert {layer.name: layer.channels for layer in grey.layers}[LOGITS] == 5
    many = models.load(f"{factories}:multispectral")
    assert (many.input_channels, resolve(many, "0").shape) == (13, (4, 222, 222))
    small = models.load(f"{factories}:cifar")
    assert small.input_size == (32, 32)
    assert resolve(small, "4").shape == (16, 10, 10)
    random = models.load(f"{factories}:cifar", "random")  # the factory's own initialization
    assert random.weights == "random"


def test_lazy_factories_and_convolutions_registered_out_of_order(factories, tmp_path):
    lazy = models.load(f"{factories}:lazy_cifar")
    assert (lazy.input_channels, lazy.input_size) == (3, (224, 224))  # lazy: any size runs
    assert models.load(f"{factories}:lazy_cifar").digest == lazy.digest  # built seeded
    small = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 14 * 14, 10),
        torch.nn.Linear(10, 4),
    )
    path = tmp_path / "cifar.pt"
    torch.save(small.state_dict(), path)
    trained = models.load(f"{factories}:lazy_cifar", str(path))  # the file sizes its layers
    assert trained.input_size == (32, 32)
    assert trained.digest == models.state_digest(small)
    grey = models.load(f"{factories}:head_first")
    assert grey.input_channels == 1


def test_a_failing_factory_is_one_line_naming_it(factories):
    with pytest.raises(AtlasError) as raised:
        models.load(f"{factories}:failing")
    message = str(raised.value)
    assert message.startswith(f"{factories}:failing raised KeyError: 'no such key'")
    assert "ATLAS_DEBUG=1" in message and "\n" not in message
    assert isinstance(raised.value.__cause__, KeyError)  # what ATLAS_DEBUG=1 shows


def test_factory_errors(factories):
    with pytest.raises(AtlasError, match="returned int, not a torch module"):
        models.load(f"{factories}:number")
    with pytest.raises(AtlasError, match="cannot import"):
        models.load(f"{factories}:missing")
    with pytest.raises(AtlasError, match="cannot import"):
        models.load("atlas_no_such_module_here:build")


# --- TorchScript -------------------------------------------------------------------------------


def small_classifier():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    ).eval()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_file_exposes_only_logits(how, tmp_path):
    module = small_classifier()
    if how == "script":
        compiled = torch.jit.script(module)
    else:
        compiled = torch.jit.trace(module, torch.zeros(1, 3, 16, 16))
    path = tmp_path / f"small-{how}.pt"
    compiled.save(str(path))
    loaded = models.load(str(path))
    assert loaded.hookable is False
    assert loaded.spec == str(path) and loaded.weights == str(path)
    assert loaded.layers == [LayerInfo(LOGITS, "output", (5,), 5)]
    assert loaded.digest == state_digest(module)
    with pytest.raises(AtlasError, match="TorchScript models expose only `logits`"):
        resolve(loaded, "0")
    with torch.no_grad():
        x = torch.rand(2, 3, 224, 224)
        torch.testing.assert_close(loaded.module(x), module(x))


def test_model_file_errors(tmp_path):
    with pytest.raises(AtlasError, match="does not exist"):
        models.load(str(tmp_path / "missing.pt"))
    state_file = tmp_path / "weights.pth"
    torch.save(small_classifier().state_dict(), state_file)
    with pytest.raises(AtlasError, match="is not a TorchScript file"):
        models.load(str(state_file))


def test_weights_file_errors(tmp_path):
    with pytest.raises(AtlasError, match="does not exist"):
        models.load("resnet18", str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(AtlasError, match="is not a PyTorch state dict"):
        models.load("resnet18", str(garbage))
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, not_tensors)
    with pytest.raises(AtlasError, match="does not hold a state dict of tensors"):
        models.load("resnet18", str(not_tensors))


# --- layer discovery -----------------------------------------------------------------------------


def sequential_model(input_size=(16, 20), input_channels=3):
    torch.manual_seed(0)
    module = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=1),
            relu1=nn.ReLU(),
            drop=nn.Dropout(0.5),  # returns its input in eval mode: not a layer
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(4, 6, 3),
            relu2=nn.ReLU(),
            gap=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 10),
        )
    )
    return LoadedModel(
        spec="seq",
        module=module,
        normalize=nn.Identity(),
        input_size=input_size,
        input_channels=input_channels,
    )


@pytest.fixture
def seq():
    return sequential_model()


def test_layers_in_execution_order_with_shapes_and_channels(seq):
    assert [(layer.name, layer.type, layer.shape, layer.channels) for layer in seq.layers] == [
        ("conv1", "Conv2d", (4, 16, 20), 4),
        ("relu1", "ReLU", (4, 16, 20), 4),
        ("pool1", "MaxPool2d", (4, 8, 10), 4),
        ("conv2", "Conv2d", (6, 6, 8), 6),
        ("relu2", "ReLU", (6, 6, 8), 6),
        ("gap", "AdaptiveAvgPool2d", (6, 1, 1), 6),
        ("flat", "Flatten", (6,), 6),
        ("fc", "Linear", (10,), 10),
        (LOGITS, "output", (10,), 10),
    ]
    assert seq.layers[3].as_dict() == {
        "name": "conv2",
        "type": "Conv2d",
        "shape": (6, 6, 8),
        "channels": 6,
        "pre_activation": None,
        "kind": "map",
        "prefix": 0,
        "module": None,
    }
    assert seq.layers is seq.layers  # measured once


def test_select_with_globs_and_names_keeps_execution_order(seq):
    def names(patterns):
        return [layer.name for layer in select(seq, patterns)]

    assert names(["relu*"]) == ["relu1", "relu2"]
    assert names(["conv?"]) == ["conv1", "conv2"]
    assert names(["fc", "conv1"]) == ["conv1", "fc"]
    assert names(["logits", "relu*", "relu2"]) == ["relu1", "relu2", "logits"]
    assert names(["*"]) == [layer.name for layer in seq.layers]
    assert names(["[cp]*1"]) == ["conv1", "pool1"]


def test_unknown_layer_names_the_closest_ones(seq):
    with pytest.raises(AtlasError, match="seq has no layer 'conv3'") as raised:
        select(seq, ["conv3"])
    hint = str(raised.value).partition("did you mean: ")[2]
    assert {"conv1", "conv2"} <= set(hint.rstrip("?)").split(", "))
    with pytest.raises(AtlasError, match="did you mean: relu1"):
        resolve(seq, "relu_1")
    with pytest.raises(AtlasError, match=re.escape("no layer of seq matches 'block*'")):
        select(seq, ["block*"])
    with pytest.raises(AtlasError, match="drop"):  # left out, so unknown
        resolve(seq, "drop")
    assert resolve(seq, "pool1") == LayerInfo("pool1", "MaxPool2d", (4, 8, 10), 4)


class SharedActivation(nn.Module):
    """One ReLU module called twice per forward pass: its output is ambiguous."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.identity = nn.Identity()

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.identity(self.act(self.conv2(x)))
        return x.mean(dim=(2, 3))


def test_module_called_twice_is_left_out():
    loaded = LoadedModel(
        spec="shared", module=SharedActivation(), normalize=nn.Identity(), input_size=(8, 8)
    )
    assert [(layer.name, layer.shape) for layer in loaded.layers] == [
        ("conv1", (4, 8, 8)),
        ("conv2", (5, 8, 8)),
        (LOGITS, (5,)),
    ]
    with pytest.raises(AtlasError, match="shared has no layer 'act'"):
        select(loaded, ["act"])


def test_discovery_failure_is_one_clear_error():
    loaded = sequential_model(input_channels=1)
    with pytest.raises(AtlasError, match=r"seq failed on a 1x16x20 input"):
        loaded.layers  # noqa: B018


def test_capture_stops_after_the_deepest_layer_and_removes_hooks(seq):
    x = torch.rand(2, 3, 16, 20)
    with capture(seq, ["conv1", "relu2"], stop_after="relu2") as outputs:
        assert run_forward(seq.module, x) is None
        assert set(outputs) == {"conv1", "relu2"}
        assert outputs["relu2"].shape == (2, 6, 6, 8)
        assert float(outputs["relu2"].min()) >= 0
    assert all(not m._forward_hooks for m in seq.module.modules())
    with capture(seq, ["conv2"]) as outputs:
        logits = run_forward(seq.module, x)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(outputs["conv2"], seq.module[:5](x))


def test_capture_is_not_fooled_by_inplace_activations():
    """torchvision models use ReLU(inplace=True): the conv before it must still be the conv's
    output (with its negative values), not the activation that overwrote it."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    loaded = LoadedModel(spec="inplace", module=module, normalize=nn.Identity(), input_size=(8, 8))
    assert "0" in [layer.name for layer in loaded.layers]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = loaded.module[0](x)
        assert float(expected.min()) < 0
        with capture(loaded, ["0"]) as outputs:
            run_forward(loaded.module, x)
    torch.testing.assert_close(outputs["0"], expected)


# --- layers ending in a saturating clamp ---------------------------------------------------------


def test_layers_ending_in_relu6_are_read_before_it_and_others_as_they_are():
    model = tiny_clamped()
    read_before = {layer.name: layer.pre_activation for layer in model.layers}
    assert {name: clamp for name, clamp in read_before.items() if clamp} == {
        "stem": "stem.2",
        "head": "head.1",
    }  # not `block` (it ends in an addition), nor a clamp itself: asked for, it gives its own
    assert LOGITS in read_before and "stem.2" in read_before and "block" in read_before
    assert resolve(model, "head").source == "head<head.1"
    assert resolve(model, "head.1").source == "head.1"


class _ConvThenClamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU6()


class _ShiftedAfterItsClamp(_ConvThenClamp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        y += 10  # the same tensor object, but no longer the clamp's values
        return y


class _ClampInputChangedLater(_ConvThenClamp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = self.conv(x)
        y = self.act(before)
        before.mul_(0)  # what a hook on the clamp's input would hold is overwritten
        return y


@pytest.mark.parametrize("block", [_ShiftedAfterItsClamp, _ClampInputChangedLater])
def test_in_place_changes_around_a_clamp_keep_the_layer_read_as_it_is(block):
    module = nn.Sequential(OrderedDict(p=block(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten()))
    loaded = LoadedModel(spec="inplace", module=module, normalize=nn.Identity(), input_size=(8, 8))
    assert resolve(loaded, "p").pre_activation is None


def test_capture_reads_a_clamped_layer_before_its_clamp():
    model = tiny_clamped()
    x = model.normalize(torch.rand(2, 3, 32, 32))
    names = ["head", "head.0", "head.1", "block"]
    with torch.no_grad(), capture(model, names, stop_after="head") as acts:
        assert run_forward(model.module, x) is None
    assert set(acts) == set(names)  # `head` and `head.0` share one hook and both are kept
    assert torch.equal(acts["head"], acts["head.0"])
    assert float(acts["head"].min()) < 0 < float(acts["head"].max())
    torch.testing.assert_close(acts["head.1"], acts["head.0"].clamp(0, 6))
    expected = model.module.block(model.module.stem(x))
    torch.testing.assert_close(acts["block"], expected)
