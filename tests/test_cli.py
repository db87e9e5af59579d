"""The `atlas` command: in-process through click's CliRunner, and as a real subprocess.

Bad input must exit with code 2 and exactly one line on stderr, `error: ...`, never a traceback.
In-process tests reuse one EfficientNet-Lite0 (loading and measuring it takes seconds); runs with
--weights and the subprocess tests go through the real loading path."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from clihelpers import assert_bad_input, make_runner
from PIL import Image
from torch import nn

from atlas import models
from atlas.cli import cli
from atlas.files import safe_name
from atlas.optim.recipes import get
from atlas.record import RunRecord

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0():
    loaded = models.load(LITE0)
    assert loaded.layers  # measure the layers once for the whole module
    return loaded


@pytest.fixture
def atlas(lite0, monkeypatch):
    """Runs `atlas ARGS...` in-process; the default Lite0 comes from the module's cache."""
    real_load = models.load

    def cached_load(spec, weights=None):
        if spec == LITE0 and weights is None:
            return lite0
        return real_load(spec, weights)

    monkeypatch.setattr(models, "load", cached_load)
    runner = make_runner()

    def invoke(*args):
        return runner.invoke(cli, [str(arg) for arg in args], catch_exceptions=True)

    return invoke


def run_atlas(*args, cwd, env=None):
    """`python -m atlas ARGS...` in a fresh interpreter (with `env` added to the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "atlas", *(str(arg) for arg in args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# --- listing -------------------------------------------------------------------------------------


def test_models_lists_the_builtins(atlas):
    result = atlas("models")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    rows = result.stdout.splitlines()
    default_row = next(row for row in rows if row.startswith(LITE0))
    assert "(default)" in default_row
    assert "224x224" in default_row
    assert "ImageNet, installed" in default_row
    assert any(row.startswith("efficientnet_lite1") for row in rows)
    count = re.search(r"any of (\d+) torchvision classification models", result.stdout)
    assert count and int(count[1]) > 50


def test_layers_json(atlas):
    result = atlas("layers", LITE0, "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)
    assert isinstance(layers, list) and len(layers) > 20
    fields = {"name", "type", "shape", "channels", "pre_activation", "kind", "prefix", "module"}
    assert all(set(layer) == fields | {"default"} for layer in layers)
    assert all(layer["channels"] == layer["shape"][0] for layer in layers)
    assert layers[-1] == {
        "name": "logits",
        "type": "output",
        "shape": [1000],
        "channels": 1000,
        "pre_activation": None,
        "kind": "vector",
        "prefix": 0,
        "module": None,
        "default": False,
    }
    assert [layer["name"] for layer in layers if layer["default"]] == [
        "stem",
        *(f"blocks.{i}" for i in range(16)),
        "head",
    ]
    by_name = {layer["name"]: layer for layer in layers}
    assert by_name["blocks.8"]["shape"] == [112, 14, 14]
    assert by_name["stem"]["shape"] == [32, 112, 112]
    # stem and head end in ReLU6 (saturating): their objectives read its input
    read_before = {layer["name"]: layer["pre_activation"] for layer in layers}
    assert {name: clamp for name, clamp in read_before.items() if clamp} == {
        "stem": "stem.2",
        "head": "head.2",
    }
    names = [layer["name"] for layer in layers]
    assert names.index("stem") < names.index("blocks.0") < names.index("blocks.15")


def test_layers_text_and_match(atlas):
    result = atlas("layers", LITE0, "--match", "blocks.8", "--match", "logits")
    assert result.exit_code == 0, result.output
    first, *lines = result.stdout.splitlines()
    # the preprocessing it is read with: (x*255 - 127) / 128, as mean and std
    assert first.startswith("input: 3x224x224, bilinear, mean 0.498,0.498,0.498 std 0.502,")
    rows = [row.split() for row in lines]
    assert rows[0] == ["layer", "type", "kind", "shape", "channels"]
    assert rows[1:3] == [
        ["*", "blocks.8", "MBConvBlock", "map", "112x14x14", "112"],
        ["logits", "output", "vector", "1000", "1000"],
    ]
    assert rows[3][0] == "*" and "default layers" in lines[3]
    result = atlas("layers", LITE0, "--match", "head")
    assert result.stdout.splitlines()[2].split() == [
        "*",
        "head",
        "Sequential",
        "map",
        "1280x7x7",
        "1280",
        *["read", "before", "head.2"],
    ]

    result = atlas("layers", LITE0, "--match", "blocks.1?", "--json")
    assert result.exit_code == 0, result.output
    assert [layer["name"] for layer in json.loads(result.stdout)] == [
        f"blocks.{i}" for i in range(10, 16)
    ]


# --- bad input: one line, exit code 2 ------------------------------------------------------------


def test_unknown_model_suggests_names(atlas, tmp_path):
    line = assert_bad_input(atlas("layers", "resnet5"), "unknown model 'resnet5'")
    assert "resnet50" in line
    line = assert_bad_input(
        atlas("visualize", "efficientnet_lite", "logits:1", "--out", tmp_path / "out"),
        "unknown model 'efficientnet_lite'",
    )
    assert "efficientnet_lite0" in line


def test_unknown_model_in_a_real_process(tmp_path):
    process = run_atlas("layers", "efficientnet_lite", cwd=tmp_path)
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    assert process.stdout == ""
    lines = process.stderr.splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("error: unknown model 'efficientnet_lite'")
    assert "efficientnet_lite0" in lines[0]


def test_unknown_layer_in_layers_match(atlas):
    line = assert_bad_input(
        atlas("layers", LITE0, "--match", "blocks.88"), "has no layer 'blocks.88'"
    )
    assert "blocks.8" in line.partition("did you mean")[2]
    assert_bad_input(atlas("layers", LITE0, "--match", "nothing*"), "no layer of")


def test_unknown_layer_in_visualize_targets(atlas, tmp_path):
    line = assert_bad_input(
        atlas("visualize", LITE0, "blocks.88:3", "--steps", 1, "--out", tmp_path),
        "has no layer 'blocks.88'",
    )
    assert "blocks.8" in line.partition("did you mean")[2]
    assert not (tmp_path / "results.json").exists()


def test_channel_out_of_range(atlas, tmp_path):
    assert_bad_input(
        atlas("visualize", LITE0, "blocks.8:999", "--steps", 1, "--size", 32, "--out", tmp_path),
        "channel 999 is out of range",
        "112",
    )
    assert not (tmp_path / "results.json").exists()


def test_class_out_of_range(atlas, tmp_path):
    assert_bad_input(
        atlas("visualize", LITE0, "logits:1000", "--steps", 1, "--size", 32, "--out", tmp_path),
        "class 1000 is out of range",
        "0-999",
    )


def test_unknown_class_label(atlas, tmp_path):
    assert_bad_input(
        atlas("visualize", LITE0, "logits:notaclass", "--steps", 1, "--out", tmp_path),
        "has no class 'notaclass'",
    )
    line = assert_bad_input(
        atlas("visualize", LITE0, "logits:hens", "--steps", 1, "--out", tmp_path),
        "has no class 'hens'",
    )
    assert "hen" in line.partition("did you mean")[2]


def test_missing_weights_file(atlas, tmp_path):
    missing = tmp_path / "nonexistent.pth"
    assert_bad_input(atlas("layers", LITE0, "--weights", missing), str(missing), "does not exist")
    assert_bad_input(
        atlas("visualize", LITE0, "logits:1", "--weights", missing, "--out", tmp_path / "out"),
        "does not exist",
    )


@pytest.mark.parametrize("model", [LITE0, "resnet18"])
def test_corrupt_weights_file(atlas, tmp_path, model):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00\xffnot a checkpoint" + bytes(range(256)) * 4)
    assert_bad_input(atlas("layers", model, "--weights", corrupt), "is not a PyTorch state dict")


def test_weights_for_another_architecture(atlas, tmp_path):
    other = tmp_path / "other.pth"
    torch.save(nn.Linear(3, 2).state_dict(), other)
    assert_bad_input(atlas("layers", LITE0, "--weights", other), f"does not fit {LITE0}")


def test_unwritable_output_folder(atlas, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert_bad_input(
        atlas("visualize", LITE0, "logits:1", "--steps", 1, "--out", blocker / "out"),
        "cannot write to",
        str(blocker / "out"),
    )
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize(
    ("device", "problem"),
    [
        ("tpu", "unknown device 'tpu': use cpu, cuda or cuda:N"),
        ("cuda:x", "unknown device 'cuda:x'"),
        *(
            []
            if torch.cuda.is_available()
            else [("cuda", "has no CUDA GPU"), ("cuda:7", "has no CUDA GPU")]
        ),
        ("cuda:99", "cuda:99") if torch.cuda.is_available() else ("cuda:99", "has no CUDA GPU"),
    ],
)
def test_a_device_this_machine_lacks(atlas, tmp_path, device, problem):
    visualize = ("visualize", LITE0, "logits:1", "--steps", 1, "--out", tmp_path / "v")
    assert_bad_input(atlas(*visualize, "--device", device), problem)
    compare = ("compare", tmp_path, tmp_path, "--out", tmp_path / "c")
    assert_bad_input(atlas(*compare, "--device", device), problem)


@pytest.mark.parametrize("command", ["run", "plan", "visualize"])
def test_a_config_file_that_is_not_utf8(atlas, tmp_path, command):
    config = tmp_path / "atlas.toml"
    config.write_bytes(f'model = "{LITE0}"\nlabel = "caf\xe9"\n'.encode("latin-1"))
    args = [LITE0, "logits:1", "--out", tmp_path / "v"] if command == "visualize" else []
    result = atlas(command, *args, "--config", config)
    assert_bad_input(result, f"config file {config} is not UTF-8 text", "save it as UTF-8")


def test_unknown_recipe(atlas, tmp_path):
    line = assert_bad_input(
        atlas("visualize", LITE0, "logits:1", "--recipe", "fourrier", "--out", tmp_path),
        "'fourrier' is not one of",
        "'fourier'",
    )
    assert "Usage" not in line


def test_model_file_that_is_not_torchscript_in_a_real_process(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"definitely not torchscript")
    process = run_atlas("layers", "model.pt", cwd=tmp_path)
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    lines = process.stderr.splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("error: model.pt is not a TorchScript file")


def test_torchscript_model_layers(atlas, tmp_path):
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6)
    )
    path = tmp_path / "small.pt"
    torch.jit.trace(module.eval(), torch.zeros(1, 3, 32, 32)).save(str(path))
    result = atlas("layers", path, "--json")
    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {
            "name": "logits",
            "type": "output",
            "shape": [6],
            "channels": 6,
            "pre_activation": None,
            "kind": "vector",
            "prefix": 0,
            "module": None,
            "default": False,
        }
    ]


# --- visualize -----------------------------------------------------------------------------------


def test_visualize_writes_images_and_results(atlas, lite0, tmp_path):
    out = tmp_path / "out"
    result = atlas(
        "visualize", LITE0, "blocks.8:3", "logits:hen", "--steps", 2, "--size", 32, "--out", out
    )
    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.stderr
    assert safe_name("blocks.8:3") == "blocks.8_3"
    assert safe_name("logits:8") == "logits_8"
    assert sorted(p.name for p in out.iterdir()) == [
        "blocks.8_3.webp",
        "logits_8.webp",
        "results.json",
    ]
    for name in ["blocks.8_3.webp", "logits_8.webp"]:
        with Image.open(out / name) as image:
            assert image.format == "WEBP"
            assert image.size == (32, 32)
            assert image.mode == "RGB"

    summary = json.loads((out / "results.json").read_text())
    run = RunRecord.from_json(summary)
    assert (run.spec, run.digest) == (LITE0, lite0.digest)
    assert summary["model"]["digest"] == lite0.digest  # the shape plan.json has too
    assert run.recipe == "fourier" and run.recipe_settings["steps"] == 2
    units = summary["units"]
    assert [unit["id"] for unit in units] == ["blocks.8:3", "logits:8"]
    assert [unit["kind"] for unit in units] == ["channel", "logit"]
    assert [unit["label"] for unit in units] == [None, "hen"]
    assert [unit["images"] for unit in units] == [["blocks.8_3.webp"], ["logits_8.webp"]]
    for unit in units:
        steps, history = zip(*unit["history"], strict=True)  # [step, value], 5 decimals
        assert steps == (0, 1) and unit["steps"] == 2
        assert all(np.isfinite(history))
        assert unit["objective_start"] == pytest.approx(history[0], abs=1e-5)
        assert unit["objective_final"] == pytest.approx(history[-1], abs=1e-5)
        assert unit["best_step"] in (0, 1)
        assert unit["objective_best"] == pytest.approx(max(history), abs=1e-5)
        assert history[unit["best_step"]] == max(history)

    lines = result.stdout.splitlines()
    assert lines[0].startswith("blocks.8:3: objective ")
    assert lines[1].startswith("logits:8 (hen): objective ")
    assert lines[-1].startswith("2 units in ")
    assert lines[-1].endswith(f"wrote {out}")


def test_visualize_takes_its_recipe_from_a_config(atlas, tmp_path):
    """--config reads [recipe] (and colour_from) from an atlas.toml, checks all its settings,
    and flags win; the rest of the file is for `atlas run`."""
    toml = tmp_path / "atlas.toml"
    toml.write_text(
        'model = "efficientnet_lite0"\nlayers = ["blocks.8"]\n'
        '[recipe]\nname = "plain"\nsteps = 2\nsize = 32\nscale = [1, 1]\n'
    )
    out = tmp_path / "out"
    result = atlas("visualize", LITE0, "logits:hen", "--config", toml, "--out", out)
    assert result.exit_code == 0, result.output
    run = RunRecord.from_json(json.loads((out / "results.json").read_text()))
    assert (run.recipe, run.recipe_settings["steps"]) == ("plain", 2)
    assert run.recipe_hash == get("plain", steps=2, size=32).hash
    flags = ["--recipe", "fourier", "--steps", 1]  # the table's other settings still apply
    result = atlas("visualize", LITE0, "logits:hen", "--config", toml, *flags, "--out", out)
    assert result.exit_code == 0, result.output
    run = RunRecord.from_json(json.loads((out / "results.json").read_text()))
    assert (run.recipe, run.recipe_settings["steps"]) == ("fourier", 1)
    assert run.recipe_hash == get("fourier", steps=1, size=32, scale=(1.0, 1.0)).hash
    toml.write_text(toml.read_text().replace("layers", "layerz"))
    assert_bad_input(
        atlas("visualize", LITE0, "logits:hen", "--config", toml, "--out", out),
        "unknown setting 'layerz'",
    )


def test_visualize_png_samples(atlas, tmp_path):
    result = atlas(
        "visualize",
        LITE0,
        "blocks.8:3",
        "--steps",
        1,
        "--size",
        32,
        "--samples",
        2,
        "--format",
        "png",
        "--out",
        tmp_path,
    )
    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    assert not list(tmp_path.glob("*.webp"))
    pixels = []
    for path in pngs:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (32, 32)
            pixels.append(np.asarray(image))
    assert not np.array_equal(pixels[0], pixels[1])  # two different variants

    (unit,) = json.loads((tmp_path / "results.json").read_text())["units"]
    assert unit["samples"] == 2
    assert unit["images"] == [path.name for path in pngs]  # in sample order
    assert len(set(unit["image_seeds"])) == 2
    # Files and ids name the unit, not the objective formula with its diversity term.
    assert unit["id"] == "blocks.8:3"
    assert [path.name for path in pngs] == ["blocks.8_3.0.png", "blocks.8_3.1.png"]


def test_visualize_samples_of_a_class(atlas, tmp_path):
    result = atlas(
        "visualize",
        LITE0,
        "logits:hen",
        "--steps",
        1,
        "--size",
        32,
        "--samples",
        2,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*.webp"))) == 2


USER_MODELS = """
from torch import nn


def grey():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def broken():
    return {}["fc"]
"""


def test_a_grey_scale_factory_of_the_user_s_own_works_from_the_cli(tmp_path):
    (tmp_path / "mymodels.py").write_text(USER_MODELS)
    process = run_atlas("layers", "mymodels:grey", "--json", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    layers = {layer["name"]: layer for layer in json.loads(process.stdout)}
    assert layers["3"]["shape"] == [6, 222, 222] and layers["3"]["default"]  # after its ReLU
    args = ["visualize", "mymodels:grey", "2:5", "--steps", "2", "--size", "32", "--out", "out"]
    process = run_atlas(*args, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert Image.open(tmp_path / "out" / "2_5.webp").size == (32, 32)


def test_a_factory_that_raises_is_one_line_naming_it_and_exit_2(tmp_path):
    (tmp_path / "mymodels.py").write_text(USER_MODELS)
    process = run_atlas("layers", "mymodels:broken", cwd=tmp_path)
    assert process.returncode == 2, process.stderr
    assert process.stderr.splitlines() == [
        "error: mymodels:broken raised KeyError: 'fc' (ATLAS_DEBUG=1 shows the traceback)"
    ]
    process = run_atlas("layers", "mymodels:broken", cwd=tmp_path, env={"ATLAS_DEBUG": "1"})
    assert process.returncode == 2
    assert 'return {}["fc"]' in process.stderr  # the user's own line, in the traceback
