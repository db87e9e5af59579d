"""Objectives: each kind raises its own value, composition, diversity."""

import pytest
import torch

from atlas.layers import capture, run_forward
from atlas.optim import channel, diversity, get, logit, neuron, region, visualize, whole_layer
from atlas.optim.objectives import (
    KINDS,
    BatchObjective,
    Objective,
    Target,
    _gram_cosines,
    as_objective,
    objective_kind,
)

PLAIN = get("plain", steps=24, size=32, lr=0.1)


def activations(model, images_uint8, layer):
    """The layer's activations for result images (uint8 HxWx3), as the model sees them."""
    x = torch.stack([torch.tensor(i).permute(2, 0, 1).float() / 255 for i in images_uint8])
    x = x[:, : model.input_channels]
    with capture(model, [layer]) as acts, torch.no_grad():
        output = run_forward(model.module, model.normalize(x))
    return output if layer == "logits" else acts[layer]


@pytest.mark.parametrize(
    "target",
    [
        channel("conv2", 3),
        neuron("conv2", 3),
        neuron("conv2", 5, (2, 9)),
        region("conv2", 3, (0, 4, 0, 16)),
        whole_layer("conv3"),
        logit(2),
    ],
    ids=lambda t: t.kind + ("@" if t.position else ""),
)
def test_each_objective_kind_raises_its_objective(tiny, target):
    (result,) = visualize(tiny, [target], PLAIN, seed=1)
    # at least tenfold or +0.1, whichever is smaller: a whole layer starts near zero
    assert result.objective_best > result.objective_start + min(
        0.1, 9 * abs(result.objective_start)
    )
    assert result.objective_best == max(result.history)
    assert len(result.history) == PLAIN.steps


def test_channel_result_image_excites_the_channel_more_than_grey(tiny):
    (result,) = visualize(tiny, [channel("conv2", 3)], PLAIN, seed=1)
    grey = torch.full((32, 32, 3), 128, dtype=torch.uint8).numpy()
    acts = activations(tiny, [result.image, grey], "conv2")[:, 3].mean((1, 2))
    assert acts[0] > acts[1] + 0.1


def test_negative_target_lowers_the_unit(tiny):
    (result,) = visualize(tiny, [channel("conv2", 3, negative=True)], PLAIN, seed=1)
    grey = torch.full((32, 32, 3), 128, dtype=torch.uint8).numpy()
    acts = activations(tiny, [result.image, grey], "conv2")[:, 3].mean((1, 2))
    assert acts[0] < acts[1] - 0.1
    assert result.id == "-conv2:3"


def test_objectives_compose_with_plus_minus_and_scalar_times():
    a, b = channel("conv2", 1), neuron("conv2", 2)
    composed = a + 0.5 * b - logit(3)
    assert isinstance(composed, Objective)
    assert [w for w, _ in composed.terms] == [1.0, 0.5, -1.0]
    assert (-a).terms == ((-1.0, a),)
    assert sum([a, b]).terms == ((1.0, a), (1.0, b))
    assert composed.layers == {"conv2", "logits"}
    assert composed.main_target == a
    assert composed.id == "+1*conv2:1 +0.5*conv2:2@centre -1*logits:3"


def test_target_ids_are_stable():
    assert channel("blocks.8", 3).id == "blocks.8:3"
    assert logit(285).id == "logits:285"
    assert neuron("blocks.8", 3, (4, 5)).id == "blocks.8:3@4,5"
    assert region("b", 1, (0, 2, 3, 4)).id == "b:1@0-2,3-4"
    assert whole_layer("b", negative=True).id == "-b"
    with pytest.raises(ValueError):
        Target("b", "channel")


def test_batch_objective_weights_terms_per_image():
    acts = {"conv2": torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 2, 2)}
    objectives = [channel("conv2", 1) * 2.0, channel("conv2", 1) - neuron("conv2", 0, (1, 1))]
    assert all(isinstance(o, Objective) for o in objectives)  # arithmetic made objectives
    values = BatchObjective(objectives)(acts)
    row0_channel1 = acts["conv2"][0, 1].mean()
    row1 = acts["conv2"][1, 1].mean() - acts["conv2"][1, 0, 1, 1]
    assert torch.allclose(values, torch.stack([2 * row0_channel1, row1]))


@pytest.fixture
def peak_kind():
    """A kind registered the way a user adds one: a channel's largest value over positions."""

    @objective_kind("peak")
    def peak(acts, group):
        return group.channel(acts).flatten(1).amax(1)

    yield
    del KINDS["peak"]


def test_a_new_objective_kind_is_one_registered_function(tiny, peak_kind):
    acts = {"conv2": torch.randn(3, 4, 5, 5)}
    targets = [Target("conv2", "peak", 2), Target("conv2", "peak", 0), channel("conv2", 1)]
    values = BatchObjective([as_objective(t) for t in targets])(acts)
    expected = [acts["conv2"][0, 2].max(), acts["conv2"][1, 0].max(), acts["conv2"][2, 1].mean()]
    assert torch.allclose(values, torch.stack(expected))
    assert Target("conv2", "peak", 2).id == "conv2:2"
    (result,) = visualize(tiny, [Target("conv2", "peak", 3)], PLAIN, seed=1)
    assert result.objective_best > result.objective_start + 0.1
    with pytest.raises(ValueError, match="needs a channel or class index"):
        Target("conv2", "peak")
    with pytest.raises(ValueError, match="unknown target kind 'peek'"):
        Target("conv2", "peek", 1)


def test_composed_objective_optimizes(tiny):
    objective = channel("conv2", 3) + 0.5 * logit(1)
    (result,) = visualize(tiny, [objective], PLAIN, seed=0)
    assert result.objective_best > result.objective_start + 0.1


def gram_similarity(model, results, layer):
    acts = activations(model, [r.image for r in results], layer)
    cos = _gram_cosines(acts)
    k = len(results)
    return float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))


def test_diversity_makes_images_of_one_unit_differ(tiny):
    target = channel("conv2", 3)
    recipe = get("plain", steps=40, size=32, lr=0.1)
    alike = visualize(tiny, [target] * 3, recipe, seed=0)
    diverse = visualize(tiny, [target] * 3, recipe.replace(diversity=20.0), seed=0)
    assert gram_similarity(tiny, diverse, "conv2") < gram_similarity(tiny, alike, "conv2") - 0.02
    # results name the unit asked for, not the formula with the recipe's diversity term
    assert diverse[0].objective == alike[0].objective and diverse[0].id == "conv2:3"
    explicit = visualize(tiny, [target + 20.0 * diversity("conv2")] * 3, recipe, seed=0)
    assert gram_similarity(tiny, explicit, "conv2") < gram_similarity(tiny, alike, "conv2") - 0.02
