"""torchvision models are built by torchvision's own builder, from the local hub cache only."""

from pathlib import Path

import pytest
import torch
import torchvision

from atlas import models
from atlas.errors import AtlasError
from atlas.layers import resolve
from atlas.record import LOGITS

# what torchvision's builder constructs before it loads each model's weights
AS_BUILT_FOR_WEIGHTS = {
    "googlenet": dict(aux_logits=True, transform_input=True, init_weights=False),
    "inception_v3": dict(aux_logits=True, transform_input=True, init_weights=False),
    "resnet18": {},
}


def published_file(name: str) -> str:
    return Path(torchvision.models.get_model_weights(name).DEFAULT.url).name


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty local hub cache in TORCH_HOME, with weights saved under their published names."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)

    def save(name: str, folder: Path = checkpoints) -> Path:
        torch.manual_seed(0)
        module = torchvision.models.get_model(name, weights=None, **AS_BUILT_FOR_WEIGHTS[name])
        path = folder / published_file(name)
        torch.save(module.state_dict(), path)
        return path

    return save


def first_layer_output(module: torch.nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    found = {}
    handle = dict(module.named_modules())[layer].register_forward_hook(
        lambda _m, _i, out: found.setdefault("out", out)
    )
    try:
        with torch.no_grad():
            module.eval()(images)
    finally:
        handle.remove()
    return found["out"]


@pytest.mark.parametrize(
    ("name", "first", "size"),
    [
        ("googlenet", "conv1", 224),
        ("inception_v3", "Conv2d_1a_3x3", 299),
        ("resnet18", "conv1", 224),
    ],
)
def test_cached_weights_give_torchvision_s_own_model(hub, name, first, size):
    hub(name)
    loaded = models.load(name)
    member = torchvision.models.get_model_weights(name).DEFAULT
    reference = torchvision.models.get_model(name, weights=member)  # the builder, offline
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ours = first_layer_output(loaded.module, first, loaded.normalize(images))
    theirs = first_layer_output(reference, first, loaded.normalize(images))
    assert torch.allclose(ours, theirs)
    assert loaded.input_size == (size, size)
    assert loaded.labels == tuple(member.meta["categories"])
    assert loaded.digest == models.state_digest(reference)
    if name != "resnet18":  # the builder's settings for pretrained weights, kept
        assert loaded.module.transform_input is True
        assert loaded.module.aux_logits == reference.aux_logits


def test_building_without_the_builder_would_feed_googlenet_other_input(hub):
    """Why the builder matters: loaded into a weights=None build, conv1 sees other input."""
    path = hub("googlenet")
    loaded = models.load("googlenet")
    plain = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    plain.load_state_dict(torch.load(path, weights_only=True))
    images = loaded.normalize(torch.rand(1, 3, 224, 224))
    difference = first_layer_output(loaded.module, "conv1", images) - first_layer_output(
        plain, "conv1", images
    )
    assert difference.abs().max() > 0.05


def test_a_state_dict_file_named_like_torchvision_s_is_built_by_the_builder(hub, tmp_path):
    elsewhere = tmp_path / "downloads"
    elsewhere.mkdir()
    path = hub("googlenet", elsewhere)
    loaded = models.load("googlenet", str(path))
    assert loaded.module.transform_input is True
    assert loaded.weights == str(path)
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")  # the private cache is gone


def test_random_weights_use_the_default_weights_input_size_and_class_names():
    loaded = models.load("inception_v3", "random")
    assert loaded.input_size == (299, 299)
    assert resolve(loaded, LOGITS).channels == 1000
    assert loaded.labels[285] == "Egyptian cat"


def test_a_cached_file_holding_code_is_refused_before_the_builder_reads_it(hub):
    path = Path(torch.hub.get_dir()) / "checkpoints" / published_file("resnet18")
    torch.save({"fc.weight": torch.zeros(2), "hook": print}, path)  # pickles a function
    with pytest.raises(AtlasError, match="not a PyTorch state dict"):
        models.load("resnet18")


@pytest.mark.parametrize("weights", ["ckpt.pth.tar", "runs/7/model.ckpt", "runs/last"])
def test_a_missing_weights_file_is_reported_as_missing_not_as_a_weights_name(weights):
    with pytest.raises(AtlasError, match=f"weights file {weights} does not exist"):
        models.load("resnet18", weights)


def test_a_fine_tuned_googlenet_file_gets_the_pretrained_build(hub, tmp_path):
    hub("googlenet")
    fine_tuned = models.load("googlenet").module  # the pretrained build: no aux heads
    torch.save({"state_dict": fine_tuned.state_dict()}, tmp_path / "fine-tuned.pth")
    loaded = models.load("googlenet", str(tmp_path / "fine-tuned.pth"))
    assert loaded.module.transform_input is True and loaded.module.aux1 is None
    assert loaded.digest == models.state_digest(fine_tuned)
    truncated = {k: v for k, v in fine_tuned.state_dict().items() if not k.startswith("conv1")}
    torch.save(truncated, tmp_path / "truncated.pth")  # missing real layers are not lent
    with pytest.raises(AtlasError, match="does not fit googlenet: .*missing .conv1"):
        models.load("googlenet", str(tmp_path / "truncated.pth"))


def test_a_wrapped_checkpoint_named_like_torchvision_s_is_unwrapped_too(hub, tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / published_file("resnet18")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    assert models.load("resnet18", str(path)).digest == models.state_digest(source)


def test_a_squeezenet_checkpoint_of_ten_classes_builds_ten(tmp_path):
    source = torchvision.models.squeezenet1_1(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "ten.pth")
    loaded = models.load("squeezenet1_1", str(tmp_path / "ten.pth"))
    assert resolve(loaded, LOGITS).channels == 10 and loaded.labels is None
