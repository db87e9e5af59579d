"""Circuits, class effects and activation maps on a model with a planted circuit."""

import io

import numpy as np
import pytest
from PIL import Image
from tinymodels import planted

from atlas.analysis import (
    GAP_GREY,
    MAP_GAP,
    analyse,
    channel_maps,
    class_effects,
    input_weights,
    map_image,
    strongest,
)
from atlas.optim import channel, get, logit, visualize

QUICK = get("fourier", steps=8, size=16)


@pytest.fixture(scope="module")
def model():
    return planted()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [(rng.random((16, 16, 3)) * 255).astype(np.uint8) for _ in range(3)]


def test_a_copy_lists_its_source_first_and_a_negation_lists_it_as_inhibiting(model, images):
    targets = [channel("mix", 0), channel("mix", 1), channel("mix", 2)]
    weights = input_weights(model, targets, images, "feat")
    assert weights.shape == (3, 4)
    assert np.argmax(weights[0]) == 0 and weights[0, 0] > 0  # copies feat.0
    assert np.argmin(weights[1]) == 0 and weights[1, 0] < 0  # subtracts feat.0
    assert np.allclose(weights[0, 1:], 0, atol=1e-6) and np.allclose(weights[1, 1:], 0, atol=1e-6)
    assert np.argmax(np.abs(weights[2])) == 2


def test_gradient_times_activation_is_what_the_gain_derivative_measures(model, images):
    """On a linear path the attribution of mix.0 to feat.0 is feat.0's mean activation."""
    import torch

    from atlas.activations import model_inputs
    from atlas.layers import capture, run_forward

    with torch.no_grad(), capture(model, ["feat"]) as acts:
        run_forward(model.module, model_inputs(model, images, torch.device("cpu")))
    mean_feat0 = acts["feat"][:, 0].mean((1, 2)).numpy()
    weights = input_weights(model, [channel("mix", 0)] * 3, images, "feat")
    assert np.allclose(weights[:, 0], mean_feat0, rtol=1e-4)


def test_class_effects_follow_the_signs_of_the_head(model, images):
    effects = class_effects(model, [channel("mix", 0), channel("mix", 2)], images[:2])
    assert effects.shape == (2, 4)
    assert effects[0, 0] > 0 and effects[0, 1] < 0  # mix.0 pushes 'up', lowers 'down'
    assert abs(effects[0, 2]) < 1e-4 and abs(effects[0, 3]) < 1e-4
    assert effects[1, 2] != 0 and np.allclose(effects[1, [0, 1, 3]], 0, atol=1e-4)


def test_strongest_keeps_each_sign_strongest_first():
    weights = np.array([0.5, -2.0, 3.0, 0.0, -0.1, 1.0])
    assert strongest(weights, 2) == ((2, 3.0), (5, 1.0), (1, -2.0), (4, -0.1))
    assert strongest(np.zeros(3), 2) == ()


def test_analyse_a_task_of_k_images_per_unit(model):
    targets = [channel("mix", 0)] * 2 + [channel("mix", 1)] * 2
    results = visualize(model, targets, QUICK.replace(diversity=1.0), seed=0)
    images = [r.image for r in results]
    starts = [r.start for r in results]
    analyses = analyse(model, targets, images, starts, samples=2, inputs_from="feat")
    assert len(analyses) == 2
    assert analyses[0].inputs[0][0] == 0 and analyses[0].inputs[0][1] > 0
    assert analyses[1].inputs[-1][0] == 0 and analyses[1].inputs[-1][1] < 0
    assert [index for index, _ in analyses[0].classes][:1] == [0]
    assert analyses[0].classes[-1][0] == 1  # 'down' is pushed down most
    with Image.open(io.BytesIO(analyses[0].maps)) as picture:
        assert picture.format == "WEBP" and picture.width > 2 * picture.height  # two maps
    low, high = analyses[0].map_range
    assert low <= high


def test_class_logits_get_inputs_and_no_class_effects_or_maps(model):
    targets = [logit(0), logit(2)]
    results = visualize(model, targets, QUICK, seed=0)
    analyses = analyse(
        model, targets, [r.image for r in results], [r.start for r in results], 1, "mix"
    )
    assert analyses[0].inputs[0][0] == 0  # class 0 reads mix.0
    assert analyses[1].inputs[0][0] == 2
    assert analyses[0].classes == () and analyses[0].maps is None


def test_maps_have_the_layers_shape(model, images):
    from atlas.layers import resolve

    height, width = resolve(model, "mix").shape[1:]
    maps = channel_maps(model, [channel("mix", 0), channel("mix", 2)], images[:2])
    assert maps.shape == (2, height, width)
    data, _ = map_image(maps[0], maps[1])
    with Image.open(io.BytesIO(data)) as picture:
        scale = picture.height // height
        assert picture.size == (2 * width * scale + MAP_GAP, height * scale)  # two maps, a gap


def test_maps_share_one_colour_scale():
    before, after = np.zeros((4, 4)), np.ones((4, 4))
    data, (low, high) = map_image(before, after)
    assert (low, high) == (0.0, 1.0)
    with Image.open(io.BytesIO(data)) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    left, right = pixels[:, : pixels.shape[1] // 3], pixels[:, -pixels.shape[1] // 3 :]
    gap = pixels[:, pixels.shape[1] // 2]
    assert (gap == GAP_GREY).all()  # the gap is neither end of the scale
    assert left.sum() < right.sum()  # the higher map is brighter


def test_an_atlas_run_stores_each_units_circuit_classes_and_maps(tmp_path):
    from click.testing import CliRunner

    from atlas.cli import cli
    from atlas.store import Store

    args = ["run", "tinymodels:planted", "--layers", "feat", "--layers", "mix", "--classes", "all"]
    args += ["--steps", "4", "--size", "16", "--scheduler", "inline", "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    records = {record.id: record for record in Store(tmp_path).records()}
    assert records["feat:0"].inputs_from is None and records["feat:0"].inputs == ()
    copy, negation = records["mix:0"], records["mix:1"]
    assert copy.inputs_from == "feat" and copy.inputs[0][0] == 0 and copy.inputs[0][1] > 0
    assert negation.inputs[-1][0] == 0 and negation.inputs[-1][1] < 0
    assert copy.classes[0][0] == 0 and copy.classes[-1][0] == 1  # pushes 'up', lowers 'down'
    assert records["logits:0"].inputs_from == "mix" and records["logits:0"].inputs[0][0] == 0
    assert (tmp_path / copy.maps).is_file() and records["logits:0"].maps is None
    again = CliRunner().invoke(cli, args)
    assert "0 done, 0 failed, 11 already stored" in again.output  # an unchanged rerun: no work
    fewer = CliRunner().invoke(cli, [*args[:3], *args[5:]])  # mix alone: its inputs change
    assert "3 done, 0 failed, 4 already stored" in fewer.output, fewer.output  # logits: still mix
    assert Store(tmp_path).index()[("mix", 0)].inputs_from is None
