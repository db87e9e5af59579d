"""Preprocessing is part of a model's identity: what it is, where it comes from (keywords, a
module's pretrained_cfg, a factory's LoadedModel, atlas's defaults), that changing it reruns a
unit while the keys of before stay where atlas chose it, and a plain module in the API."""

import json
import sys

import numpy as np
import pytest
import torch
from clihelpers import assert_bad_input, invoke
from PIL import Image
from tinymodels import tiny_model
from torch import nn

from atlas import config as config_module
from atlas import models
from atlas.exemplars import fit
from atlas.models import InputNormalization, LoadedModel, Preprocessing, wrap
from atlas.optim import Target, get, logit, visualize
from atlas.optim.transforms import resize
from atlas.plan import make_plan, unit_key

FACTORIES = """
import os

import torch
from torch import nn

from atlas.models import InputNormalization, LoadedModel


def constant_rgb():  # weights that do not depend on torch's random numbers
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7)
    )
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p) * (i + 1) / 4)
    return module


def with_cfg():  # a module carrying a timm-style pretrained_cfg, its mean from the environment
    module = constant_rgb()
    mean = float(os.environ.get("ATLAS_TEST_MEAN", "0.5"))
    module.pretrained_cfg = {
        "mean": (mean,) * 3, "std": (0.5, 0.5, 0.5), "input_size": (3, 40, 40),
        "interpolation": "bicubic", "crop_pct": 0.875,
    }
    return module


def loaded_with_cfg():  # a LoadedModel wins over its module's pretrained_cfg
    return LoadedModel(
        spec="x", module=with_cfg(), normalize=InputNormalization((2.0,) * 3, (-1.0,) * 3),
        input_size=(24, 24),
    )


def bad_cfg():
    module = constant_rgb()
    module.pretrained_cfg = {"mean": (0.5, 0.5), "std": (0.5, 0.5)}
    return module
"""


@pytest.fixture
def factories(importable):
    """The name of a fresh importable module holding the factories above."""
    return importable(FACTORIES)


def plan_keys(spec: str, **flags) -> dict[str, str]:
    config = config_module.build(None, model=spec, recipe="plain", out="unused", **flags)
    plan = make_plan(config, models.load(spec))
    return {unit.id: unit.key for unit in plan.units}


# --- keys of before stay -------------------------------------------------------------------------


def test_the_unit_key_formula_is_unchanged():
    """Computed on main before preprocessing entered the keys (a fixed identity string)."""
    key = unit_key("0123456789abcdef", "blocks.8", 3, get("plain", steps=17), 1, 0)
    assert key == "1e8673fa9669b54e1229cf0fce94c3275cd0ea3e3d75b57511ac002f61a248b4"


def test_a_plain_factory_module_keeps_the_keys_it_had(factories):
    """Keys of a factory's plain module read with atlas's defaults, computed on main before
    preprocessing entered the keys: its atlas does not rerun. (A changed recipe preset would
    change them, as it should.)"""
    keys = plan_keys(
        f"{factories}:constant_rgb",
        layers=("0",),
        channels="1",
        classes="2",
        recipe_overrides={"steps": 17},
    )
    assert keys == {
        "0:1": "4d3f921a52671590b8e9eff17141e9c691b0e3ac402f3a5f5d82772bdad8de6f",
        "logits:2": "587b3a97e1786ff1708d70abd1ceaa0c92402b0541b65f984fb4124f1c7b93d9",
    }
    loaded = models.load(f"{factories}:constant_rgb")
    assert loaded.identity == loaded.digest  # keyed by its weights alone, as before


def test_a_changed_preprocessing_changes_the_identity(tiny):
    assert tiny.identity.startswith(tiny.digest + "+")  # a LoadedModel: keyed with it
    same = LoadedModel(
        "tiny",
        tiny.module,
        InputNormalization((2.0,) * 3, (-1.0,) * 3),
        input_size=(32, 32),
        labels=tiny.labels,
    )
    assert same.identity == tiny.identity
    others = [
        LoadedModel(
            "t",
            tiny.module,
            InputNormalization.mean_std((0.5,) * 3, (0.25,) * 3),
            input_size=(32, 32),
        ),
        LoadedModel("t", tiny.module, tiny.normalize, input_size=(40, 40)),
        LoadedModel("t", tiny.module, tiny.normalize, input_size=(32, 32), resize="bicubic"),
        LoadedModel("t", tiny.module, tiny.normalize, input_size=(32, 32), crop=0.875),
    ]
    identities = {model.identity for model in others} | {tiny.identity}
    assert len(identities) == 5
    assert {model.digest for model in others} == {tiny.digest}  # the weights are the same


# --- what the preprocessing is -------------------------------------------------------------------


def test_preprocessing_of_an_affine_normalization_of_any_kind(tiny):
    import torchvision.transforms as T

    ours = tiny.preprocessing
    assert (ours.scale, ours.shift, ours.size, ours.channels) == (
        (2, 2, 2),
        (-1, -1, -1),
        (32, 32),
        3,
    )
    assert ours.mean == (0.5, 0.5, 0.5) and ours.std == (0.5, 0.5, 0.5)
    theirs = LoadedModel("t", tiny.module, T.Normalize((0.5,) * 3, (0.5,) * 3), input_size=(32, 32))
    assert theirs.preprocessing == ours  # torchvision's Normalize: the same affine map
    odd = LoadedModel("t", tiny.module, nn.Tanh(), input_size=(32, 32)).preprocessing
    assert odd.scale == () and odd.other.startswith("Tanh ")
    assert odd.as_json()["other"] == odd.other and "mean" not in odd.as_json()


def test_preprocessing_describes_itself_in_one_line():
    preprocessing = Preprocessing((2.0,) * 3, (-1.0,) * 3, (299, 299), 3, "bicubic", 0.875)
    assert preprocessing.describe() == (
        "3x299x299, bicubic, crop 0.875, mean 0.5,0.5,0.5 std 0.5,0.5,0.5"
    )
    recorded = preprocessing.as_json()
    assert recorded == {
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "size": [299, 299],
        "channels": 3,
        "resize": "bicubic",
        "crop": 0.875,
    }
    with pytest.raises(ValueError, match="resize must be one of bilinear, bicubic, nearest"):
        LoadedModel("t", nn.Identity(), nn.Identity(), resize="lanczos")


def test_a_module_with_a_pretrained_cfg_is_read_with_it(factories):
    loaded = models.load(f"{factories}:with_cfg")
    assert (loaded.input_size, loaded.resize, loaded.crop) == ((40, 40), "bicubic", 0.875)
    assert loaded.preprocessing.mean == (0.5,) * 3
    assert loaded.preprocessing_from == "the module's pretrained_cfg"
    assert loaded.identity != loaded.digest


def test_a_factory_loaded_model_wins_over_its_modules_cfg(factories):
    loaded = models.load(f"{factories}:loaded_with_cfg")
    assert (loaded.input_size, loaded.resize, loaded.crop) == ((24, 24), "bilinear", 1.0)
    assert loaded.preprocessing.mean == (0.5,) * 3 and loaded.preprocessing.std == (0.5,) * 3
    assert loaded.preprocessing_from == "the factory's LoadedModel"


def test_a_cfg_that_does_not_fit_the_channels_is_one_line(factories):
    result = invoke("layers", f"{factories}:bad_cfg")
    assert_bad_input(result, "mean has 2 values for 3 channels", "pretrained_cfg")


def test_wrap_keywords_win_over_the_cfg_and_the_defaults(factories):
    module = __import__(factories).with_cfg()
    wrapped = wrap(module, mean=0.25, input_size=(48, 64), resize="nearest")
    assert wrapped.input_size == (48, 64) and wrapped.resize == "nearest"
    assert wrapped.preprocessing.mean == (0.25,) * 3
    assert wrapped.preprocessing.std == (0.5,) * 3  # from the cfg
    assert wrapped.crop == 0.875 and wrapped.preprocessing_from == "set by the caller"
    plain = wrap(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    assert (plain.input_channels, plain.input_size) == (1, (224, 224))
    assert plain.identity == plain.digest  # atlas's defaults: keyed as before
    with pytest.raises(TypeError, match="expected a torch nn.Module, got str"):
        wrap("resnet18")


# --- where it applies ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_resize_modes(mode):
    images = torch.rand(2, 3, 20, 30)
    assert resize(images, (10, 15), mode).shape == (2, 3, 10, 15)


def test_exemplar_photos_are_cropped_and_resized_as_the_model_says():
    photo = Image.new("RGB", (100, 100), (0, 0, 0))
    photo.paste((255, 255, 255), (40, 40, 60, 60))  # a white square in the middle fifth
    whole = fit(photo, (10, 10), 3)
    cropped = fit(photo, (10, 10), 3, "bicubic", 0.5)  # the middle half: the square is larger
    brightness = [np.asarray(image, dtype=float).mean() for image in (whole, cropped)]
    assert brightness[1] > 2 * brightness[0]


# --- the Python API ------------------------------------------------------------------------------


def test_visualize_takes_a_plain_module_and_refuses_anything_else():
    module = tiny_model().module
    recipe = get("plain", steps=2, size=16)
    [result] = visualize(module, [Target("conv2", "channel", 1)], recipe, seed=0)
    assert result.image.shape == (16, 16, 3)
    wrapped = wrap(module, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=32)
    [same] = visualize(wrapped, [logit(3)], recipe, seed=0)
    assert same.id == "logits:3"
    with pytest.raises(TypeError, match="takes a torch nn.Module or an atlas.models.LoadedModel"):
        visualize("tinymodels:tiny", [logit(3)], recipe)


# --- runs: a changed normalization reruns; atlases made before keep their units once -------------


SMALL = [
    "--channels",
    "0-1",
    "--classes",
    "0",
    "--steps",
    "2",
    "--size",
    "16",
]  # 3 units, 2 steps each


def run(spec: str, layer: str, out) -> object:
    return invoke("run", spec, "--layers", layer, *SMALL, "--scheduler", "inline", "--out", out)


def plan(spec: str, layer: str, out) -> object:
    return invoke("plan", spec, "--layers", layer, *SMALL, "--no-calibrate", "--out", out)


def test_a_changed_factory_normalization_reruns_its_units(factories, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("ATLAS_TEST_MEAN", "0.5")
    first = run(f"{factories}:with_cfg", "1", out)
    assert "3 done, 0 failed, 0 already stored of 3 units" in first.stdout, first.output
    recorded = json.loads((out / "plan.json").read_text())["model"]["preprocessing"]
    assert (recorded["mean"], recorded["size"]) == ([0.5, 0.5, 0.5], [40, 40])
    again = run(f"{factories}:with_cfg", "1", out)
    assert "0 done, 0 failed, 3 already stored of 3 units" in again.stdout, again.output
    monkeypatch.setenv("ATLAS_TEST_MEAN", "0.45")  # the factory's normalization corrected
    sys.modules.pop(factories)
    planned = plan(f"{factories}:with_cfg", "1", out)
    assert "3 of 3 units to do" in planned.stdout, planned.output
    rerun = run(f"{factories}:with_cfg", "1", out)
    assert "3 done, 0 failed, 0 already stored of 3 units" in rerun.stdout, rerun.output
    site = (out / "site" / "index.html").read_text()
    assert "40x40, bicubic, crop 0.875, mean 0.45,0.45,0.45 std 0.5,0.5,0.5" in site


def test_an_atlas_made_before_preprocessing_was_keyed_keeps_its_units_once(tmp_path):
    out = tmp_path / "out"
    spec = "tinymodels:tiny"
    assert run(spec, "conv2", out).exit_code == 0
    # made as atlas made it before: keys of the weights digest alone, no preprocessing recorded
    model = models.load(spec)
    config = config_module.build(
        None,
        model=spec,
        layers=("conv2",),
        channels="0-1",
        classes="0",
        recipe_overrides={"steps": 2, "size": 16},
        out=str(out),
    )
    before = {u.id: u.key for u in make_plan(config, model, model.digest).units}
    for path in (out / "units").glob("*/*.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "key": before[record["id"]]}))
    recorded = json.loads((out / "plan.json").read_text())
    del recorded["model"]["preprocessing"]
    (out / "plan.json").write_text(json.dumps(recorded))

    planned = plan(spec, "conv2", out)
    assert "3 units stored before preprocessing was part of unit keys are kept" in planned.stdout
    assert "0 of 3 units to do" in planned.stdout
    result = run(spec, "conv2", out)
    assert result.exit_code == 0, result.output
    assert "kept 3 units stored before preprocessing was part of unit keys" in result.stdout
    assert "0 done, 0 failed, 3 already stored of 3 units" in result.stdout
    again = run(spec, "conv2", out)
    assert "kept" not in again.stdout and "3 already stored" in again.stdout
