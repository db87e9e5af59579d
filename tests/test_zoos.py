"""timm and Hugging Face models through the real CLI, with random weights (nothing can be
downloaded here): read with their own preprocessing, which plan.json, results.json and the
site record; their layers, default layers and logits; a 2-step visualize and a tiny run with
its site. The matrix of one model per timm family is bench/models.py (docs/models.md)."""

import importlib.util
import json

import pytest
import torch
from clihelpers import assert_bad_input, invoke

from atlas import models
from atlas.record import RunRecord

pytest.importorskip("timm")
pytest.importorskip("transformers")


QUICK = ["--weights", "random", "--steps", "2", "--size", "32"]  # a 2-step visualize


def layer_rows(stdout: str) -> dict[str, list[str]]:
    """`atlas layers` rows by layer name: [mark, type, kind, shape, channels, ...]."""
    rows = {}
    for line in stdout.splitlines()[2:-1]:
        mark, rest = line[:2].strip(), line[2:].split()
        rows[rest[0]] = [mark, *rest[1:]]
    return rows


def defaults(stdout: str) -> list[str]:
    return [name for name, row in layer_rows(stdout).items() if row[0] == "*"]


def small_run(spec: str, out, *args: str):
    return invoke(
        "run",
        spec,
        "--weights",
        "random",
        "--steps",
        "1",
        "--size",
        "32",
        "--classes",
        "",
        "--scheduler",
        "inline",
        "--out",
        out,
        *args,
    )


# --- timm --------------------------------------------------------------------------------------


def test_atlas_models_lists_every_source():
    result = invoke("models")
    assert result.exit_code == 0, result.output
    for form in (
        "efficientnet_lite0 (default)",
        "torchvision classification models",
        "timm:NAME[.TAG]",
        "hf:ORG/NAME",
        "package.module:factory",
        "FILE.pt",
    ):
        assert form in result.stdout


@pytest.mark.parametrize(
    ("spec", "layer"),
    [("timm:efficientnet_b0", "bn1"), ("timm:regnety_002", "stem.bn.act")],
)
def test_timm_batchnorm_act_models_read_and_run(spec, layer, tmp_path):
    """Their BatchNormAct2d holds its activation as a child: folding crashed on it before."""
    listed = invoke("layers", spec, "--weights", "random")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.startswith(
        "input: 3x224x224, bicubic, crop 0.875, mean 0.485,0.456,0.406 std 0.229,0.224,0.225 "
        f"(timm's pretrained_cfg of {spec.removeprefix('timm:')}."
    )
    main_path = defaults(listed.stdout)
    assert len(main_path) >= 8 and layer_rows(listed.stdout)[layer][2] == "map"
    middle = main_path[len(main_path) // 2]
    targets = [f"{layer}:0", f"{middle}:1", "logits:goldfish"]
    shown = invoke("visualize", spec, *targets, *QUICK, "--out", tmp_path)
    assert shown.exit_code == 0, shown.output
    assert "logits:1 (goldfish)" in shown.stdout  # timm's ImageNet classes
    results = json.loads((tmp_path / "results.json").read_text())
    preprocessing = RunRecord.from_json(results).preprocessing
    assert (preprocessing["resize"], preprocessing["crop"]) == ("bicubic", 0.875)
    assert len(results["units"]) == 3


def test_timm_vit_is_read_with_its_half_mean_and_std_and_runs_with_its_site(tmp_path):
    out = tmp_path / "vit"
    result = small_run(
        "timm:vit_small_patch16_224", out, "--layers", "blocks.11", "--channels", "0-1"
    )
    assert "2 done, 0 failed" in result.stdout, result.output
    plan = json.loads((out / "plan.json").read_text())
    preprocessing = plan["model"]["preprocessing"]
    assert (preprocessing["mean"], preprocessing["std"]) == ([0.5] * 3, [0.5] * 3)
    assert preprocessing["crop"] == 0.9 and preprocessing["resize"] == "bicubic"
    [layer] = plan["layers"]
    assert (layer["kind"], layer["prefix"], layer["shape"]) == ("tokens", 1, [384, 14, 14])
    site = (out / "site" / "index.html").read_text()
    assert "3x224x224, bicubic, crop 0.9, mean 0.5,0.5,0.5 std 0.5,0.5,0.5" in site


def test_timm_inception_is_fed_299_px(tmp_path):
    out = tmp_path / "inception"
    result = small_run("timm:inception_v3", out, "--layers", "Mixed_6b", "--channels", "0")
    assert "1 done, 0 failed" in result.stdout, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"]["preprocessing"]["size"] == [299, 299]
    assert plan["layers"][0]["shape"] == [768, 17, 17]  # 12x12 when it was fed 224 px


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache."""
    import huggingface_hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_timm_pretrained_weights_come_from_the_local_cache(hub_cache):
    import timm
    from safetensors.torch import save_file

    missing = invoke("layers", "timm:resnet18")
    assert_bad_input(missing, "hf download timm/resnet18.a1_in1k", "--weights random")
    torch.manual_seed(1)
    module = timm.create_model("resnet18")
    snapshot = hub_cache / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(module.state_dict(), snapshot / "model.safetensors")
    (hub_cache / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (hub_cache / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0123abcd")
    loaded = models.load("timm:resnet18")
    assert loaded.digest == models.state_digest(module)
    assert loaded.weights.endswith("model.safetensors")
    tagged = invoke("layers", "timm:resnet18", "--weights", "a2_in1k", "--match", "fc")
    assert_bad_input(tagged, "hf download timm/resnet18.a2_in1k")


def test_timm_bad_names_are_one_line():
    assert_bad_input(invoke("layers", "timm:resnet5O"), "timm has no model", "resnet50")
    assert_bad_input(
        invoke("layers", "timm:resnet18.no_such_tag"), "no pretrained weights", "a1_in1k"
    )


def test_a_missing_timm_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a)
    )
    assert_bad_input(invoke("layers", "timm:resnet18"), "pip install 'atlas[timm]'")
    assert "not installed" in invoke("models").stdout


# --- Hugging Face ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Small classifiers as a user gives one offline: a folder with config.json (and the image
    processor's preprocessor_config.json)."""
    from transformers import (
        BertConfig,
        ConvNextConfig,
        ConvNextImageProcessor,
        ViTConfig,
        ViTImageProcessor,
    )

    root = tmp_path_factory.mktemp("hf")
    labels = {i: f"thing{i}" for i in range(5)}
    vit = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 32, "width": 32}
    ).save_pretrained(root / "vit")
    vit.save_pretrained(root / "bare-vit")  # no image processor
    convnext = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=4)
    convnext.save_pretrained(root / "convnext")
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(
        root / "convnext"
    )
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        root / "bert"
    )
    return root


def test_hf_vit_tokens_logits_and_labels(hf_folders, tmp_path):
    spec = f"hf:{hf_folders / 'vit'}"
    listed = invoke("layers", spec, "--weights", "random")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.startswith(
        "input: 3x32x32, bilinear, mean 0.5,0.5,0.5 std 0.5,0.5,0.5 (its image processor"
    )
    rows = layer_rows(listed.stdout)
    assert rows["vit.layers.1"][2:5] == ["tokens", "+1", "32x4x4"]
    assert rows["vit.layers.1.cls"][-3:-1] == ["cls-token", "32"]
    assert rows["logits"][1:] == ["output", "vector", "5", "5"]
    assert defaults(listed.stdout)[-2:] == ["vit.layers.0", "vit.layers.1"]
    targets = ["vit.layers.1:3", "logits:thing2"]
    shown = invoke("visualize", spec, *targets, *QUICK, "--out", tmp_path / "shown")
    assert shown.exit_code == 0, shown.output
    assert "logits:2 (thing2)" in shown.stdout
    out = tmp_path / "run"
    ran = small_run(spec, out, "--channels", "0", "--classes", "thing1")
    assert "4 done, 0 failed" in ran.stdout, ran.output  # 3 default layers, 1 class
    assert (out / "site" / "index.html").is_file()
    assert json.loads((out / "plan.json").read_text())["labels"][1] == "thing1"


def test_hf_convnext_channels_last_and_its_processors_crop(hf_folders):
    listed = invoke("layers", f"hf:{hf_folders / 'convnext'}", "--weights", "random")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.startswith("input: 3x64x64, bicubic, crop 0.875, mean 0.5,0.5,0.5")
    rows = layer_rows(listed.stdout)
    assert rows["convnext.encoder.stages.1.layers.0.pwconv1"][2:4] == ["channels-last", "64x8x8"]
    assert len(defaults(listed.stdout)) >= 8


def test_hf_without_an_image_processor_says_what_it_uses(hf_folders):
    listed = invoke("layers", f"hf:{hf_folders / 'bare-vit'}", "--weights", "random")
    assert listed.exit_code == 0, listed.output
    assert "(no image processor found: ImageNet mean/std at 32 px)" in listed.stdout.splitlines()[0]


def test_hf_weights_file_and_bad_input(hf_folders, tmp_path):
    spec = f"hf:{hf_folders / 'vit'}"
    random = models.load(spec, "random")
    path = tmp_path / "vit.pt"
    torch.save({k: v + 1 for k, v in random.module.state_dict().items()}, path)
    trained = models.load(spec, str(path))
    assert trained.digest != random.digest and trained.weights == str(path)
    assert_bad_input(invoke("layers", spec, "--weights", "IMAGENET1K_V1"), "--weights random")
    assert_bad_input(invoke("layers", "hf:nobody/nothing"), "hf download nobody/nothing")
    bert = invoke("layers", f"hf:{hf_folders / 'bert'}", "--weights", "random")
    assert_bad_input(bert, "is no image classifier")
