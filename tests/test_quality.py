"""Quality measures (atlas.quality) on tiny models and synthetic images with known answers."""

import math

import numpy as np
import pytest
import torch
from tinymodels import tiny_model
from torch import nn

from atlas import activations, quality
from atlas.models import InputNormalization, LoadedModel
from atlas.optim import channel, get, logit, visualize


def noise_image(size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def gradient_image(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    return (np.stack([x, y, (x + y) / 2], axis=-1) * 255).astype(np.uint8)


def stripes(period: float, size: int = 64) -> torch.Tensor:
    """Vertical sine stripes, a float [3, H, W] tensor: all energy at 1/period cycles/pixel."""
    x = torch.arange(size, dtype=torch.float32)
    row = 0.5 + 0.4 * torch.sin(2 * math.pi * x / period)
    return row.expand(3, size, size).clone()


# --- high-frequency share --------------------------------------------------------------------


def test_white_noise_has_a_higher_high_frequency_share_than_a_smooth_gradient():
    noisy, smooth = (
        quality.high_frequency_share(noise_image()),
        quality.high_frequency_share(gradient_image()),
    )
    # white noise: the frequency square outside a circle of radius 0.25, 1 - pi/16 = 0.80
    assert noisy == pytest.approx(1 - math.pi / 16, abs=0.05)
    assert smooth < 0.01


def test_high_frequency_share_puts_the_cutoff_at_a_quarter_cycle_per_pixel():
    assert quality.high_frequency_share(stripes(period=16)) < 0.01  # 0.0625 cycles/pixel
    assert quality.high_frequency_share(stripes(period=2.5)) > 0.99  # 0.4 cycles/pixel
    # the Hann window spreads a frequency over +-2 bins (+-0.03 cycles/pixel at 64 px)
    assert quality.high_frequency_share(stripes(period=16), cutoff=0.02) > 0.99


def test_high_frequency_share_of_a_flat_image_is_zero_and_forms_agree():
    assert quality.high_frequency_share(np.full((16, 16, 3), 128, np.uint8)) == 0.0
    image = noise_image(32)
    as_tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert quality.high_frequency_share(image) == pytest.approx(
        quality.high_frequency_share(as_tensor)
    )


# --- activations -----------------------------------------------------------------------------


def hooked_mean(model: LoadedModel, layer: str, index: int, image: np.ndarray) -> float:
    """The reference: channel mean at `layer`, computed by hand with a forward hook."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = nn.functional.interpolate(x, size=model.input_size, mode="bilinear", antialias=True)
    seen = {}
    module = dict(model.module.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    try:
        with torch.no_grad():
            model.module(model.normalize(x))
    finally:
        handle.remove()
    return float(seen["out"][0, index].mean())


def test_clean_activations_are_each_units_activation_on_its_own_resized_image(tiny):
    images = [noise_image(48, seed=1), gradient_image(20), noise_image(32, seed=2)]
    targets = [channel("relu2", 3), channel("conv1", 0), channel("relu2", 7)]
    values = activations.clean_activations(tiny, targets, images, batch_size=2)
    expected = [
        hooked_mean(tiny, t.layer, t.index, im) for t, im in zip(targets, images, strict=True)
    ]
    assert values == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert not any(h for m in tiny.module.modules() for h in m._forward_hooks.values())


def test_activation_grid_evaluates_every_objective_on_every_image(tiny):
    images = [noise_image(32, seed=s) for s in range(3)] + [gradient_image(32)]
    targets = [channel("relu2", i) for i in range(5)] + [logit(2)]
    grid = activations.activation_grid(tiny, targets, images, batch_size=3)
    assert grid.shape == (4, 6)
    for row, image in enumerate(images):
        diagonal = activations.clean_activations(tiny, targets, [image] * len(targets))
        assert grid[row] == pytest.approx(diagonal, rel=1e-5, abs=1e-6)


def test_a_grey_model_takes_colour_images():
    model = tiny_model(in_channels=1)
    values = activations.clean_activations(model, [channel("relu1", 0)], [noise_image(32)])
    assert len(values) == 1 and math.isfinite(values[0])


def test_an_image_optimized_for_a_unit_scores_a_higher_ratio_than_noise(tiny):
    # units that are alive at the grey starting image (TinyNet's others stay at 0 there)
    targets = [channel("relu2", i) for i in (3, 8, 10, 11)]
    results = visualize(tiny, targets, get("plain", steps=24, size=32, lr=0.2), seed=0)
    natural = [gradient_image(32), noise_image(32, seed=5), np.flipud(gradient_image(32))]
    optimized = quality.activation_ratios(tiny, targets, [r.image for r in results], natural)
    noise = quality.activation_ratios(tiny, targets, [noise_image(32, seed=9)] * 4, natural)
    for good, bad in zip(optimized, noise, strict=True):
        assert good > 2.0 and good > 2 * bad


def test_activation_ratio_is_undefined_without_a_positive_natural_maximum():
    assert quality.activation_ratio(3.0, 2.0) == 1.5
    assert math.isnan(quality.activation_ratio(3.0, 0.0))


def test_lengths_must_match(tiny):
    with pytest.raises(ValueError, match="2 objectives but 1 images"):
        activations.clean_activations(tiny, [logit(0), logit(1)], [noise_image(8)])
    with pytest.raises(ValueError, match="1 images but 2 classes"):
        quality.transfer_scores(tiny, [noise_image(8)], [0, 1])


# --- transfer --------------------------------------------------------------------------------


def colour_judge() -> LoadedModel:
    """Six classes by mean colour: 0 red, 1 green, 2 blue; 3, 4, 5 rank below them in order,
    so for a pure colour class 5 is always last (outside the top 5)."""
    fc = nn.Linear(3, 6, bias=False)
    with torch.no_grad():
        fc.weight.copy_(
            torch.tensor([[10.0, 0, 0], [0, 10, 0], [0, 0, 10]] + [[-k] * 3 for k in (1, 2, 3)])
        )
    module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    return LoadedModel("colours", module, InputNormalization((1.0,) * 3, (0.0,) * 3), (8, 8))


def test_transfer_scores_a_constructed_judge():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    green = np.roll(red, 1, axis=-1)
    scores = quality.transfer_scores(colour_judge(), [red, red, green], [0, 5, 0])
    assert [s.top1 for s in scores] == [True, False, False]
    assert [s.top5 for s in scores] == [True, False, True]
    assert scores[0].probability > 0.99 and scores[1].probability < 1e-4


def test_clipped_share_counts_blown_out_pixels():
    from atlas.quality import clipped_share

    gradient = np.tile(np.linspace(20, 235, 64, dtype=np.uint8), (64, 1))
    assert clipped_share(np.stack([gradient] * 3, -1)) == 0.0
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, :4] = 255
    assert clipped_share(half) == 1.0
    quarter = np.full((8, 8, 3), 128, np.uint8)
    quarter[:4, :4] = 254  # within 3 levels of white
    assert clipped_share(quarter) == 0.25
