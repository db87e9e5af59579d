"""Parameterizations and transforms: invertible, differentiable, colour statistics."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from atlas.errors import AtlasError
from atlas.optim import get
from atlas.optim.param import ImageParam, colour_matrix, colour_matrix_from_folder
from atlas.optim.transforms import DRAWS_PER_STEP, apply, blur


@pytest.mark.parametrize("kind", ["fourier", "pixel"])
@pytest.mark.parametrize("colour", ["imagenet", "none"])
def test_encoding_an_image_and_decoding_it_gives_it_back(kind, colour):
    param = ImageParam(2, 3, 24, kind=kind, colour=colour_matrix(colour, 3))
    images = torch.rand(2, 3, 24, 24) * 0.9 + 0.05
    param.encode(images)
    assert torch.allclose(param(), images, atol=1e-4)


def test_fourier_start_is_grey_with_little_noise():
    param = ImageParam(4, 3, 64, kind="fourier", colour=colour_matrix("imagenet", 3))
    param.initialize(torch.randn(4, 3, 64, 33, 2), 0.01)
    image = param().detach()
    assert abs(float(image.mean()) - 0.5) < 0.02
    assert 0.001 < float(image.std()) < 0.1


def test_transforms_pass_gradients_and_differ_per_image():
    recipe = get("fourier", colour_jitter=(0.02, 0.01, 0.02, 0.01))
    images = torch.full((2, 3, 32, 32), 0.5, requires_grad=True)
    pattern = torch.rand(1, 3, 32, 32)
    draws = torch.rand(2, DRAWS_PER_STEP, generator=torch.Generator().manual_seed(0))
    view = apply(images + pattern, draws, recipe, (48, 48))
    assert view.shape == (2, 3, 48, 48)
    assert not torch.allclose(view[0], view[1])
    view.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_blur_smooths_without_moving_the_mean():
    noise = torch.rand(1, 3, 32, 32)
    smooth = blur(noise, 1.5)
    assert smooth.std() < noise.std() * 0.6
    assert abs(float(smooth.mean() - noise.mean())) < 0.01


def test_colour_matrix_from_a_folder_recolours_like_its_photos(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random((64, 64, 1))
    for i in range(3):  # strongly correlated channels, as in natural photos
        rgb = np.clip(base * np.array([1.0, 0.8, 0.6]) + rng.random((64, 64, 3)) * 0.2, 0, 1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(tmp_path / f"photo{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    values = colour_matrix_from_folder(tmp_path)
    matrix = torch.tensor(values).view(3, 3)
    assert torch.isclose(matrix.norm(dim=0).max(), torch.tensor(1.0))
    # colouring white noise reproduces the photos' covariance (up to scale)
    covariance = matrix @ matrix.T
    correlation = covariance / covariance.diagonal().sqrt().outer(covariance.diagonal().sqrt())
    assert correlation[0, 1] > 0.8 and correlation[0, 2] > 0.8


def test_colour_matrix_from_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AtlasError, match="no images found"):
        colour_matrix_from_folder(tmp_path)


@pytest.mark.parametrize("size", [32, 31])
def test_a_phase_image_keeps_its_magnitude_and_contrast_whatever_its_phase(size):
    param = ImageParam(2, 3, size, kind="phase", colour=None, contrast=1.5)
    param.initialize(torch.randn(2, 3, size, size // 2 + 1), 0.01)  # the scale is not used
    optimizer = torch.optim.NAdam(param.parameters(), lr=1.0)
    for _ in range(3):  # push the phase around: the spectrum's magnitude cannot follow
        optimizer.zero_grad()
        (param()[:, :, :16, :16].mean() - param()[:, :, 16:, 16:].mean()).backward()
        optimizer.step()
    latent = param.latent().detach()
    torch.testing.assert_close(latent.std(dim=(-2, -1)), torch.full((2, 3), 1.5))
    assert float(latent.mean(dim=(-2, -1)).abs().max()) < 1e-5
    magnitude = param.latent.magnitude
    spectrum = torch.fft.rfft2(latent, norm="ortho").abs()
    ratio = spectrum[..., magnitude > 0] / magnitude[magnitude > 0]  # every column, edges too
    spread = ratio.amax(dim=-1) / ratio.amin(dim=-1)
    assert float(spread.max()) < 1.001  # one scale per image and channel: the 1/f magnitude


def test_phase_images_start_from_uniform_random_phases():
    param = ImageParam(2, 3, 64, kind="phase", colour=colour_matrix("imagenet", 3))
    param.initialize(torch.randn(2, 3, 64, 33, generator=torch.Generator().manual_seed(0)), 0.01)
    phases = param.latent.phase.detach().flatten()
    assert float(phases.abs().max()) <= math.pi
    counts = torch.histc(phases, bins=8, min=-math.pi, max=math.pi)
    assert float(counts.min()) > 0.8 * float(counts.mean())  # about flat
    image = param().detach()
    assert not torch.allclose(image[0], image[1], atol=0.05)  # two different images
    assert 0.3 < float(image.mean()) < 0.7 and float(image.std()) > 0.05


def test_encoding_gives_a_phase_image_back():
    def phase_param() -> ImageParam:
        return ImageParam(2, 3, 24, kind="phase", colour=colour_matrix("imagenet", 3))

    source = phase_param()
    source.initialize(torch.randn(2, 3, 24, 13), 1.0)
    images = source().detach()
    copy = phase_param()
    copy.encode(images)
    torch.testing.assert_close(copy(), images, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"param": "phase", "blur_every": 10, "blur_sigma": 1.0}, "cannot be blurred"),
        ({"param": "phase", "octaves": get("octaves").octaves}, "cannot be blurred or upscaled"),
        ({"contrast": 2.0}, "contrast applies to param = phase only"),
        ({"param": "phase", "contrast": float("inf")}, "contrast must be positive"),
    ],
)
def test_phase_settings_that_would_do_nothing_or_break_are_refused(settings, message):
    with pytest.raises(AtlasError, match=message):
        get("fourier", **settings)


def test_settings_added_later_leave_stored_keys_alone():
    """Atlases stored before `optimizer`, `contrast`, `views`, `warmup` and `schedule` existed
    must not rerun: the recipe they were made with (the default then: Lucid's 0.9-1.1 scale,
    1/f, Adam, 128 px) hashes as it did."""
    old_default = get("fourier", size=128, scale=(0.9, 1.1), decay=1.0, optimizer="adam")
    assert old_default.hash == "3792892c1e025aee"
    assert get("fourier", optimizer="adam").hash != get("fourier").hash
    assert get("fourier", views=2).hash != get("fourier").hash
    assert get("maco", contrast=2.0).hash != get("maco").hash


@pytest.mark.parametrize(("setting", "name"), [("kind", "fourrier"), ("squash", "tanh")])
def test_an_unknown_parameterization_or_squash_raises_instead_of_falling_back(setting, name):
    with pytest.raises(AtlasError, match=f"unknown .*{name!r}; choose one of"):
        ImageParam(1, 3, 8, **{setting: name})


def test_recipes_name_exactly_the_registered_parameterizations_and_squashes():
    from atlas.optim.param import LATENTS, SQUASHES
    from atlas.optim.recipes import PARAMETERIZATIONS, SQUASH_NAMES

    assert (set(PARAMETERIZATIONS), set(SQUASH_NAMES)) == (set(LATENTS), set(SQUASHES))
