"""The trust score: how much a unit's picture looks like its exemplars on the way up."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from synthetic import make_image_folder

import atlas.trust
from atlas.cli import cli
from atlas.store import Store
from atlas.trust import naturalness, trust_score


def patterns(rng, centre, count, spread=0.3):
    return [{"a": centre + spread * rng.normal(size=centre.shape)} for _ in range(count)]


def test_a_typical_picture_is_natural_and_an_extreme_one_is_not():
    rng = np.random.default_rng(0)
    randoms = patterns(rng, np.full(16, 2.0), 64, spread=1.0)
    typical = patterns(rng, np.full(16, 2.0), 1, spread=1.0)[0]
    extreme = {"a": np.full(16, 2.0) + 6 * rng.normal(size=16)}  # far beyond every random image
    assert 0.2 < trust_score(typical, [], randoms)["score"] <= 1
    assert trust_score(extreme, [], randoms)["score"] == 0.0
    assert naturalness(np.full(16, 2.0), np.stack([r["a"] for r in randoms])) == 1.0


def test_agreement_runs_from_chance_to_an_exemplar():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)
    exemplars = patterns(rng, 2 + direction, 6)
    randoms = patterns(rng, np.full(16, 2.0), 64, spread=1.0)
    like_exemplars = trust_score({"a": 2 + direction}, exemplars, randoms)["agreement"]
    like_random = trust_score(patterns(rng, np.full(16, 2.0), 1, 1.0)[0], exemplars, randoms)
    opposite = trust_score({"a": 2 - direction}, exemplars, randoms)["agreement"]
    assert like_exemplars == 1.0 and like_random["agreement"] < 0.3 and opposite == 0.0


def test_no_agreement_without_two_exemplars_or_a_shared_direction():
    rng = np.random.default_rng(1)
    randoms = patterns(rng, np.zeros(8), 32, spread=1.0)
    assert (
        trust_score({"a": np.ones(8)}, patterns(rng, np.ones(8), 1), randoms)["agreement"] is None
    )
    scattered = patterns(rng, np.zeros(8), 6, spread=1.0)  # exemplars no different from random
    assert trust_score({"a": np.ones(8)}, scattered, randoms)["agreement"] is None
    assert trust_score({}, [], randoms) == {"score": None, "layers": [], "agreement": None}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    make_image_folder(folder)
    return folder


def run(out, photos, *extra):
    args = ["run", "tinymodels:tiny", "--layers", "conv1", "--layers", "conv2", "--channels"]
    args += ["0-3", "--classes", "0-1", "--steps", "3", "--size", "32", "--scheduler", "inline"]
    return CliRunner().invoke(cli, [*args, "--exemplars", str(photos), "--out", str(out), *extra])


def test_units_with_exemplars_and_an_earlier_layer_get_a_score_once(tmp_path, photos, monkeypatch):
    first = run(tmp_path, photos)
    assert first.exit_code == 0 and "trust: 10 units scored, " in first.output
    units = {u.id: u for u in Store(tmp_path).classify()[0]}
    assert units["conv1:0"].trust["score"] is None  # no layer before conv1
    for name in ("conv2:1", "logits:0"):
        trust = units[name].trust
        layers = [layer for layer, _ in trust["layers"]]  # in the model's order
        assert layers[0] == "conv1" and ("conv2" in layers) == (name == "logits:0")
        assert 0 <= trust["score"] <= 1
    measured = units["conv2:1"].trust  # inputs and classes on the picture and its exemplars
    assert measured["images"] == 1 + len(units["conv2:1"].exemplars)
    assert [list(pair) for pair in units["conv2:1"].inputs] == measured["inputs"] != []
    assert [list(pair) for pair in units["conv2:1"].classes] == measured["classes"] != []
    own = {r.id: r for r in Store(tmp_path).records()}["conv2:1"]  # the picture's alone
    assert own.inputs and own.inputs != units["conv2:1"].inputs
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert any("trust" in unit for unit in manifest["units"])

    calls = []
    real = atlas.trust.pattern_task
    monkeypatch.setattr(atlas.trust, "pattern_task", lambda m, t: calls.append(t) or real(m, t))
    unchanged = run(tmp_path, photos)
    assert unchanged.exit_code == 0 and calls == [] and "trust:" not in unchanged.output
    again = run(tmp_path, photos, "--steps", "4")  # new pictures: new scores
    assert again.exit_code == 0 and calls
    units = {u.id: u for u in Store(tmp_path).classify()[0]}
    assert units["conv2:1"].trust["unit_key"] == units["conv2:1"].key
