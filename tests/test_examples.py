"""docs/examples/: each example's atlas.toml through the real `atlas` command, in-process.

The examples need the user's weights and images; here they run with `--weights random` (or
random state-dict files where a command reads weights back) for a couple of steps at tiny
sizes, so that every setting of every atlas.toml is parsed, validated and used by the command
its README documents. Every folder under docs/examples/ must have a test here."""

import json
import re
import shlex
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from clihelpers import assert_bad_input, make_runner
from PIL import Image

from atlas import config, models
from atlas.cli import cli
from atlas.optim.param import colour_matrix_from_folder
from atlas.optim.recipes import DEFAULT_DIVERSITY, Octave, Recipe
from atlas.record import RunRecord

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
EXERCISED: set[str] = set()  # the examples that have a test below


def exercises(name: str):
    """Marks a test as the one that runs docs/examples/NAME."""
    EXERCISED.add(name)
    return lambda test: test


def toml_of(name: str) -> Path:
    return EXAMPLES / name / "atlas.toml"


@pytest.fixture(scope="module")
def loaded() -> dict[tuple, models.LoadedModel]:
    """(spec, weights) -> the model, loaded once for the module."""
    return {}


@pytest.fixture
def atlas(monkeypatch, loaded):
    """Runs `atlas ARGS...` in-process; exit code 0 or the test fails. Each (model, weights)
    is loaded once for the whole module: a run plans and optimizes with the same random
    weights, and `atlas compare` finds the models its atlases were made with."""
    real_load = models.load

    def load(spec, weights=None):
        if (spec, weights) not in loaded:
            loaded[spec, weights] = real_load(spec, weights)
        return loaded[spec, weights]

    monkeypatch.setattr(models, "load", load)
    runner = make_runner()

    def invoke(*args):
        result = runner.invoke(cli, [str(arg) for arg in args], catch_exceptions=True)
        assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
        return result

    return invoke


def plan_of(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())


def done_units(out: Path) -> list[str]:
    units = json.loads((out / "manifest.json").read_text())["units"]
    assert all(unit["status"] == "done" for unit in units), units
    return sorted(unit["id"] for unit in units)


def recipe_of(plan: dict) -> Recipe:
    """The recipe a run stored in plan.json, as a Recipe again."""

    def tuples(settings: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}

    settings = tuples(plan["recipe_settings"])
    settings["octaves"] = tuple(Octave(**tuples(octave)) for octave in settings["octaves"])
    return Recipe(**settings)


# --- every example is tested, and its settings are checked ------------------------------------


def test_every_example_folder_has_a_test_an_atlas_toml_and_a_readme():
    folders = sorted(path.name for path in EXAMPLES.iterdir() if path.is_dir())
    assert folders, f"no examples in {EXAMPLES}"
    assert sorted(EXERCISED) == folders, "an example without a test, or a test without one"
    for name in folders:
        assert toml_of(name).is_file(), name
        assert (EXAMPLES / name / "README.md").is_file(), name


def misspellings(text: str):
    """(what, text with that setting's name misspelt) for every setting of an atlas.toml:
    top-level keys and tables, [recipe] keys, and the keys of octave tables."""
    data = tomllib.loads(text)
    for key, value in data.items():
        pattern = rf"^\[{key}\]" if isinstance(value, dict) else rf"^{key}(?=\s*=)"
        replacement = f"[{key}x]" if isinstance(value, dict) else f"{key}x"
        yield key, re.sub(pattern, replacement, text, count=1, flags=re.M)
    recipe = data["recipe"] if isinstance(data.get("recipe"), dict) else {}
    head, header, table = text.partition("\n[recipe]\n")
    for key in recipe:
        yield key, head + header + re.sub(rf"^{key}(?=\s*=)", f"{key}x", table, count=1, flags=re.M)
    for key in {key for octave in recipe.get("octaves", []) for key in octave}:
        yield key, re.sub(rf"([{{,]\s*){key}(\s*=)", rf"\g<1>{key}x\2", text, count=1)


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.iterdir() if path.is_dir()))
def test_a_misspelt_or_unknown_setting_fails_the_example(name, tmp_path):
    """What each example test relies on: `atlas plan` and `atlas visualize --config` refuse
    an atlas.toml with any setting misspelt, before loading a model."""
    text = toml_of(name).read_text()
    runner = make_runner()
    cases = [*misspellings(text), ("bogus", "bogus = 1\n" + text)]
    assert len(cases) > 5
    for key, bad in cases:
        assert bad != text, f"{key} was not misspelt"
        path = tmp_path / "atlas.toml"
        path.write_text(bad)
        wrong = key if key == "bogus" else f"{key}x"
        for args in (
            ["plan", "--config", path, "--out", tmp_path / "out", "--no-calibrate"],
            ["visualize", "resnet18", "logits:0", "--config", path, "--out", tmp_path / "out"],
        ):
            result = runner.invoke(cli, [str(arg) for arg in args])
            assert_bad_input(result, repr(wrong))
    assert not (tmp_path / "out").exists()


# --- the examples --------------------------------------------------------------------------------

FAST = shlex.split("--scheduler inline")  # atlas run in this process, no Dask cluster


@exercises("resnet50-keras")
def test_resnet50_keras(atlas, tmp_path):
    example, out = toml_of("resnet50-keras"), tmp_path / "out"
    tiny = shlex.split("--weights random --steps 2 --size 32 --channels 0")
    atlas("run", "--config", example, *tiny, *FAST, "--out", out)
    plan = plan_of(out)
    assert plan["model"]["spec"] == "resnet50"
    assert plan["recipe"]["name"] == "plain"
    assert (plan["recipe_settings"]["steps"], plan["recipe_settings"]["param"]) == (2, "pixel")
    assert done_units(out) == ["layer2.0.conv3:0"]  # no class logits: classes = ""
    recipe = config.build(example).recipe
    assert (recipe.steps, recipe.size, recipe.lr, recipe.redirect_relu) == (30, 224, 0.05, 0)
    assert planned_units(atlas, example, tmp_path) == 64


@exercises("resnet18-classes")
def test_resnet18_classes(atlas, tmp_path):
    example, out = toml_of("resnet18-classes"), tmp_path / "out"
    tiny = shlex.split("--weights random --steps 2 --size 32 --classes 0-1")
    atlas("run", "--config", example, *tiny, *FAST, "--out", out)
    assert plan_of(out)["recipe"]["name"] == "blur-l2"
    assert done_units(out) == ["logits:0", "logits:1"]  # layers = ["logits"]: no channels
    assert planned_units(atlas, example, tmp_path) == 1000


def planned_units(atlas, example: Path, tmp_path: Path, *flags) -> int:
    """The units `atlas plan` finds for the example as it stands (random weights)."""
    args = ["--weights", "random", *flags, "--out", tmp_path / "plan", "--no-calibrate"]
    summary = json.loads(atlas("plan", "--config", example, *args, "--json").stdout)
    return sum(layer["units"] for layer in summary["layers"])


def test_the_checkpoint_recipe_grows_from_64_to_400_px_by_1_1_every_50_steps():
    recipe = config.build(toml_of("resnet50-checkpoints")).recipe
    sizes = [round(64 * 1.1**k) for k in range(20)] + [400]
    assert 64 * 1.1**19 < 400 < 64 * 1.1**20
    assert [(stage.steps, stage.size) for stage in recipe.stages()] == [(50, s) for s in sizes]
    for k, octave in enumerate(recipe.octaves[:-1]):
        assert octave.scale == pytest.approx(64 * 1.1**k / 400, rel=1e-12)


@exercises("resnet50-checkpoints")
def test_resnet50_checkpoints_and_compare(atlas, tmp_path):
    """The README's commands: runs of the one atlas.toml, each with its own --weights (a
    state-dict file, which `atlas compare` reloads) and --out, then `atlas compare`. One
    random checkpoint and two seeds stand in for two checkpoints (each model loaded costs
    seconds). 21 steps: one per octave, so that every octave runs; on `conv1`, where steps
    are cheap."""
    example = toml_of("resnet50-checkpoints")
    assert planned_units(atlas, example, tmp_path) == 2 * 64 + 8
    weights = tmp_path / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    tiny = shlex.split("--steps 21 --size 64 --layers conv1 --channels 0 --classes ''")
    outs = [tmp_path / "vanilla", tmp_path / "stylized"]
    for seed, out in enumerate(outs):
        flags = ["--weights", weights, "--seed", seed, *tiny, *FAST]
        atlas("run", "--config", example, *flags, "--out", out)
        plan = plan_of(out)
        assert (plan["model"]["weights"], plan["seed"]) == (str(weights), seed)
        assert done_units(out) == ["conv1:0"]
        stages = recipe_of(plan).stages()
        assert [stage.steps for stage in stages] == [1] * 21
        assert [stage.size for stage in stages] == [max(8, round(64 * s)) for s in _scales()]
    result = atlas("compare", *outs, "--out", tmp_path / "compare", "--device", "cpu")
    assert "compared 1 units" in result.stdout
    compared = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert compared["matched"] == 1
    assert (tmp_path / "compare" / "index.html").is_file()


def _scales() -> list[float]:
    octaves = tomllib.loads(toml_of("resnet50-checkpoints").read_text())["recipe"]["octaves"]
    return [octave["scale"] for octave in octaves]


@exercises("inceptionv3-mixed6b")
def test_inceptionv3_octaves_grow_and_run(atlas, tmp_path):
    example = toml_of("inceptionv3-mixed6b")
    recipe = config.build(example).recipe
    assert [(stage.size, stage.lr, stage.blur) for stage in recipe.stages()] == [
        (299, (0.4, 0.3), (2.4, 0.8)),
        (340, (0.3, 0.2), (1.5, 0.4)),
        (380, (0.2, 0.1), (1.1, 0.3)),
    ]
    grown = tmp_path / "grow"
    tiny = shlex.split(
        "--weights random --steps 3 --size 32 --device cpu"
    )  # 3 octaves, 1 step each
    grow = ["Mixed_6b:5", "--grow", "--grow-step", "145", "--config", example]
    result = atlas("visualize", "inception_v3", *grow, *tiny, "--out", grown)
    assert "2 frames over its 17x17 map" in result.stdout
    summary = json.loads((grown / "results.json").read_text())
    run = RunRecord.from_json(summary)
    assert run.recipe == "octaves" and run.grow
    assert run.recipe_hash == config.load_recipe(example, steps=3, size=32).hash
    assert [frame["k"] for frame in summary["units"][0]["frames"]] == [145, 289]
    assert (grown / "Mixed_6b_5.grow.webp").is_file()
    # the same atlas.toml plans an atlas of Mixed_6b's channels for `atlas run`
    assert planned_units(atlas, example, tmp_path) == 64


@pytest.fixture
def in_cifar_example(monkeypatch):
    """The working directory of the CIFAR example, where atlas imports model.py from."""
    folder = EXAMPLES / "cifar10-factory"
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("model", None)


def write_photos(folder: Path, tint: tuple[float, float, float], count: int = 5) -> Path:
    """A few small random PNGs with correlated colour channels (a colour matrix needs them)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        grey = rng.random((24, 24, 1))
        rgb = np.clip(grey * np.array(tint) + 0.2 * rng.random((24, 24, 3)), 0, 1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@exercises("cifar10-factory")
def test_cifar10_factory_with_samples_and_colour_from_photos(atlas, in_cifar_example, tmp_path):
    photos = write_photos(tmp_path / "photos", (0.9, 0.6, 0.3))
    out = tmp_path / "out"
    tiny = shlex.split("--weights random --steps 2 --channels 0 --classes cat,dog")
    atlas("run", "--config", "atlas.toml", "--colour-from", photos, *tiny, *FAST, "--out", out)
    plan = plan_of(out)
    assert plan["model"]["spec"] == "model:cifar10_net"
    assert plan["samples"] == 4
    settings = plan["recipe_settings"]
    assert settings["colour"] == list(colour_matrix_from_folder(photos))
    assert (settings["size"], settings["diversity"]) == (32, DEFAULT_DIVERSITY)
    assert done_units(out) == ["block1:0", "block2:0", "block3:0", "logits:3", "logits:5"]
    record = json.loads((out / "units" / "logits" / "3.json").read_text())
    assert record["label"] == "cat"
    assert len(record["images"]) == 4
    # the recipe (so every unit key) follows the images' colours, not the folder's path
    moved = shutil.copytree(photos, tmp_path / "elsewhere")
    other = write_photos(tmp_path / "other", (0.2, 0.5, 0.9))
    recipes = [
        config.build("atlas.toml", colour_from=str(f)).recipe for f in (photos, moved, other)
    ]
    assert recipes[0].hash == recipes[1].hash != recipes[2].hash
    as_run = recipes[0].replace(steps=2, diversity=DEFAULT_DIVERSITY)
    assert plan["recipe"]["hash"] == as_run.hash
    flags = ["--colour-from", photos]
    assert planned_units(atlas, Path("atlas.toml"), tmp_path, *flags) == (64 + 128 + 256 + 10)
