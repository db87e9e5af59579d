"""visualize(): batching, determinism, hooks, truncation, recipes, devices."""

import itertools
import math

import numpy as np
import pytest
import torch
from tinymodels import tiny_clamped, tiny_model

from atlas.activations import activation_grid, clean_activations
from atlas.change import change, cross
from atlas.errors import AtlasError
from atlas.optim import PRESETS, channel, get, logit, neuron, visualize, whole_layer

QUICK = get("fourier", steps=12, size=32)


def all_hooks(module):
    return [
        hook
        for m in module.modules()
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    ]


def test_a_unit_s_picture_made_alone_is_close_to_the_one_made_in_a_batch(tiny):
    """Each image has its own random stream: made alone, a unit starts from the same image
    and sees the same transforms as in a batch. Only the arithmetic differs (a convolution
    over 4 images may sum in another order than over 1, by build and machine), and the
    optimization carries that on: the pictures are close, not identical (only the same batch
    gives the same bytes, tested below), and each drives its unit as the other does."""
    targets = [channel("conv2", 1), neuron("conv2", 5), logit(3), whole_layer("conv3")]
    batched = visualize(tiny, targets, QUICK, seed=7)
    alone = [visualize(tiny, [target], QUICK, seed=7)[0] for target in targets]
    grey = np.full_like(batched[0].image, 128)
    on_grey = activation_grid(tiny, targets, [grey])[0].tolist()
    own_batched = clean_activations(tiny, targets, [r.image for r in batched])
    own_alone = clean_activations(tiny, targets, [r.image for r in alone])
    for i, (one, together) in enumerate(zip(alone, batched, strict=True)):
        assert one.seed == together.seed
        assert np.abs(one.start.astype(int) - together.start.astype(int)).max() <= 1
        assert one.history[0] == pytest.approx(together.history[0], rel=1e-4, abs=1e-5)
        assert np.abs(one.image.astype(float) - together.image.astype(float)).mean() <= 1.0
        sides = [cross(own_alone[i], own_batched[i], on_grey[i])]
        sides.append(cross(own_batched[i], own_alone[i], on_grey[i]))
        score = change(sides)
        assert math.isnan(score) or score <= 0.05, (targets[i], score)


def test_same_seed_same_images_other_seed_other_images(tiny):
    targets = [channel("conv2", 1), logit(2)]
    first = visualize(tiny, targets, QUICK, seed=3)
    again = visualize(tiny, targets, QUICK, seed=3)
    other = visualize(tiny, targets, QUICK, seed=4)
    for a, b, c in zip(first, again, other, strict=True):
        assert (a.image == b.image).all() and a.history == b.history
        assert not (a.image == c.image).all()


def test_hooks_are_removed_after_success_and_after_an_exception(tiny):
    visualize(tiny, [channel("conv2", 1)], QUICK)
    assert all_hooks(tiny.module) == []

    def explode(done, total):
        if done == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        visualize(tiny, [channel("conv2", 1), logit(1)], QUICK, on_step=explode)
    assert all_hooks(tiny.module) == []


def test_the_forward_pass_stops_after_the_deepest_needed_layer(tiny):
    assert tiny.layers  # the one dry forward pass of layer discovery happens first
    calls = {"conv3": 0, "fc": 0}
    for name in calls:

        def count(_module, _inputs, name=name):
            calls[name] += 1

        getattr(tiny.module, name).register_forward_pre_hook(count)
    visualize(tiny, [channel("conv2", 1), channel("conv1", 0)], QUICK)
    assert calls == {"conv3": 0, "fc": 0}
    passes = QUICK.steps + 1  # every step, then the best images once without transforms
    visualize(tiny, [channel("conv3", 1)], QUICK)
    assert calls == {"conv3": passes, "fc": 0}
    visualize(tiny, [logit(0)], QUICK)
    assert calls["fc"] == passes


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_recipe_runs_and_raises_the_objective(tiny, name):
    recipe = get(name, steps=24, size=40)
    (result,) = visualize(tiny, [channel("conv2", 3)], recipe, seed=0)
    assert result.image.shape == (40, 40, 3) and result.image.dtype == np.uint8
    assert len(result.history) == 24
    assert result.objective_best > result.objective_start
    assert 0 <= result.best_step < 24


def test_octaves_grow_the_image_to_the_final_size():
    recipe = get("octaves", steps=30, size=48)
    stages = recipe.stages()
    assert [s.size for s in stages] == [24, 36, 48]
    assert sum(s.steps for s in stages) == 30
    # best step lies in the last octave: the returned image has the final size
    (result,) = visualize(tiny_model(), [logit(1)], recipe)
    assert result.best_step >= 20 and result.image.shape == (48, 48, 3)


def test_recipe_hash_follows_settings_not_names():
    base = get("fourier")
    assert base.hash == base.replace(name="renamed").hash
    assert base.hash != base.replace(steps=100).hash
    assert get("fourier", steps=None).hash == base.hash  # None overrides are ignored
    with pytest.raises(AtlasError, match="did you mean: steps"):
        base.replace(stepz=3)
    with pytest.raises(AtlasError, match="unknown recipe 'fourrier'.*fourier"):
        get("fourrier")
    with pytest.raises(AtlasError, match="lr must be positive"):
        base.replace(lr=0)


def test_grayscale_models_get_grey_rgb_images():
    grey_model = tiny_model(in_channels=1)
    (result,) = visualize(grey_model, [channel("conv2", 2)], QUICK)
    assert result.image.shape == (32, 32, 3)
    assert (result.image[..., 0] == result.image[..., 2]).all()
    assert result.objective_best > result.objective_start


def test_small_models_get_transforms_scaled_to_their_size(tiny):
    # a 12 px pad at 128 px is 3 px at 32 px: the warped view keeps most of the image
    from atlas.optim.transforms import apply

    recipe = get("fourier")
    images = torch.rand(2, 3, 32, 32)
    draws = torch.full((2, 8), 0.5)  # no jitter, scale 1, no rotation
    view = apply(images, draws, recipe, (32, 32))
    inner = view[:, :, 4:-4, 4:-4]
    assert (inner - 0.5).abs().mean() > 0.1  # content, not padding


def test_out_of_range_units_are_clear_errors(tiny):
    with pytest.raises(AtlasError, match="channel 12 is out of range: conv2 has 12"):
        visualize(tiny, [channel("conv2", 12)], QUICK)
    with pytest.raises(AtlasError, match="class 10 is out of range"):
        visualize(tiny, [logit(10)], QUICK)
    with pytest.raises(AtlasError, match="outside the 16x16 map"):
        visualize(tiny, [neuron("conv2", 1, (16, 0))], QUICK)
    with pytest.raises(AtlasError, match="did you mean: conv2"):
        visualize(tiny, [channel("conv22", 1)], QUICK)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_with_bf16_autocast_matches_the_cpu_result_closely(tiny):
    targets = [channel("conv2", 1), logit(3)]
    on_gpu = visualize(tiny, targets, QUICK, seed=1, device="cuda")
    on_cpu = visualize(tiny_model(), targets, QUICK, seed=1, device="cpu")
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.objective_best > gpu.objective_start
        assert abs(gpu.objective_best - cpu.objective_best) < 0.2 * abs(cpu.objective_best) + 0.1


def test_the_activation_is_measured_on_the_image_as_stored(tiny):
    from atlas.activations import clean_activations

    results = visualize(tiny, [channel("conv2", 1), logit(3)], QUICK, seed=5)
    images = [result.image for result in results]
    expected = clean_activations(tiny, [result.objective for result in results], images)
    assert [r.activation for r in results] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert results[0].activation != pytest.approx(results[0].objective_best, rel=1e-3)


def test_a_layer_ending_in_relu6_keeps_improving_past_the_clamp(caplog):
    """Read after its ReLU6 the head would stop at 6 and keep an early image as its best."""
    model = tiny_clamped()
    recipe = get("fourier", steps=48, size=32)
    results = visualize(model, [channel("head", c) for c in range(4)], recipe)
    past = [r for r in results if r.objective_best > 6]
    assert len(past) >= 2, [r.objective_best for r in results]
    for result in past:
        crossed = next(step for step, value in enumerate(result.history) if value > 6)
        assert result.best_step > crossed + 4, (crossed, result.best_step)
    assert "folding BatchNorm changed" not in caplog.text  # stem's fold agrees before its clamp


def test_a_clamped_layer_and_the_layers_inside_it_in_one_batch():
    model = tiny_clamped()
    targets = [channel("head", 0), channel("head.1", 0), channel("head.0", 0)]
    results = visualize(model, targets, get("fourier", steps=4, size=32))
    assert [r.id for r in results] == ["head:0", "head.1:0", "head.0:0"]
    assert 0 <= results[1].objective_best <= 6  # the clamp itself, asked for, is saturated


def test_visualize_leaves_the_caller_s_random_generators_alone(tiny):
    import random

    import numpy as np

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    first = visualize(tiny, [channel("conv2", 0)], get("plain", steps=3, size=32), seed=1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    again = visualize(tiny, [channel("conv2", 0)], get("plain", steps=3, size=32), seed=1)
    assert (first[0].image == again[0].image).all()  # its own streams still make it repeatable


def test_one_view_draws_what_it_always_did_and_more_views_average_theirs(tiny):
    targets = [channel("conv2", 1), logit(2)]
    default = visualize(tiny, targets, QUICK, seed=5)
    one = visualize(tiny, targets, QUICK.replace(views=1), seed=5)
    assert QUICK.replace(views=1).hash == QUICK.hash
    for a, b in zip(default, one, strict=True):
        assert (a.image == b.image).all() and a.history == b.history
    four = visualize(tiny, targets, QUICK.replace(views=4), seed=5)
    assert QUICK.replace(views=4).hash != QUICK.hash
    for result in four:
        assert result.objective_best > result.objective_start
    # a view's random stream is its image's: alone, the first step sees what it saw batched
    (alone,) = visualize(tiny, targets[:1], QUICK.replace(views=4), seed=5)
    assert alone.history[0] == pytest.approx(four[0].history[0], rel=1e-4, abs=1e-5)


def test_the_learning_rate_schedule_warms_up_and_decays_to_zero():
    recipe = get("fourier", steps=101, warmup=0.1, schedule="cosine")
    factors = [recipe.lr_factor(step) for step in range(101)]
    assert factors[0] < 0.1 and factors[9] < 1 and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert [get("fourier", steps=8).lr_factor(s) for s in range(8)] == [1.0] * 8
    with pytest.raises(AtlasError, match="schedule must be one of constant, cosine"):
        get("fourier", schedule="linear")
    with pytest.raises(AtlasError, match="warmup"):
        get("fourier", warmup=1.0)
