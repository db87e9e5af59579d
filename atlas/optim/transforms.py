"""Random, differentiable transforms drawn per image (robustness priors).

Pad, jitter, scale and rotation are folded into one affine warp per image, sampled in one
`grid_sample` call that also resizes to the model's input size; colour jitter is a per-image
affine map of colours. Gradients flow through both to the optimized image. Pad and jitter are
given in pixels of a 128 px image and scale with the image size, so a 32 px CIFAR model gets
proportionally small transforms instead of ImageNet-sized ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

REFERENCE_SIZE = 128
# uniform draws per image and step: jitter y, jitter x, scale, angle, brightness, contrast,
# saturation, hue
DRAWS_PER_STEP = 8

# RGB <-> YIQ: hue is a rotation of the IQ plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def affine_matrices(draws: torch.Tensor, recipe) -> torch.Tensor:
    """[B, 2, 3] `affine_grid` matrices (output -> input coordinates, normalized) for uniform
    draws in [0, 1) of shape [B, DRAWS_PER_STEP]."""
    unit = 2.0 / REFERENCE_SIZE  # one reference pixel in normalized coordinates
    half_extent = 1.0 + recipe.pad * unit
    low, high = recipe.scale
    scale = low + (high - low) * draws[:, 2]
    angle = torch.deg2rad(recipe.rotate * (2 * draws[:, 3] - 1))
    shift_y = recipe.jitter * unit * (2 * draws[:, 0] - 1)
    shift_x = recipe.jitter * unit * (2 * draws[:, 1] - 1)
    zoom = half_extent / scale
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    row_x = torch.stack([cos, -sin, shift_x], dim=1)
    row_y = torch.stack([sin, cos, shift_y], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def warp(
    images: torch.Tensor,
    matrices: torch.Tensor,
    out_size: tuple[int, int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Sample each image through its affine matrix at `out_size` with the model's resize
    `mode`; outside is grey (0.5)."""
    grid = F.affine_grid(matrices, [images.shape[0], 1, *out_size], align_corners=False)
    sampled = F.grid_sample(images - 0.5, grid, mode=mode, align_corners=False)
    return sampled + 0.5


def colour_jitter(images: torch.Tensor, draws: torch.Tensor, amounts) -> torch.Tensor:
    """Per-image brightness, contrast, saturation (factors 1 +- amount) and hue (+- amount of
    a full turn), differentiable. `amounts` is (brightness, contrast, saturation, hue)."""
    if images.shape[1] != 3 or not any(amounts):
        return images
    low_high = torch.tensor(amounts[:3], dtype=images.dtype, device=images.device)
    factors = (1 + low_high * (2 * draws[:, 4:7] - 1)).view(-1, 3, 1, 1, 1)
    brightness, contrast, saturation = factors.unbind(1)
    hue = (amounts[3] * (2 * draws[:, 7] - 1) * 2 * math.pi).view(-1, 1, 1, 1)
    x = images * brightness
    grey = TF.rgb_to_grayscale(x)
    x = (x - grey.mean((2, 3), keepdim=True)) * contrast + grey.mean((2, 3), keepdim=True)
    grey = TF.rgb_to_grayscale(x)
    x = grey + (x - grey) * saturation
    yiq = torch.einsum("oc,bchw->bohw", _RGB_TO_YIQ.to(x), x)
    cos, sin = torch.cos(hue), torch.sin(hue)
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    yiq = torch.cat([yiq[:, :1], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("oc,bchw->bohw", _YIQ_TO_RGB.to(x), yiq)


def apply(
    images: torch.Tensor,
    draws: torch.Tensor,
    recipe,
    out_size: tuple[int, int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """The model's view of the optimized images for one step: warped, resized (with the
    model's resize `mode`), colour-jittered."""
    if recipe.has_geometric_transforms:
        images = warp(images, affine_matrices(draws, recipe), out_size, mode)
    elif tuple(images.shape[-2:]) != tuple(out_size):
        images = resize(images, out_size, mode)
    return colour_jitter(images, draws, recipe.colour_jitter)


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """How an image is shown to a model at another size: bilinear (or the model's bicubic or
    nearest), with antialiasing where the mode has it."""
    smooth = mode != "nearest"
    return F.interpolate(
        images, size=size, mode=mode, antialias=smooth, align_corners=False if smooth else None
    )


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a kernel of about four sigmas."""
    if sigma <= 0:
        return images
    kernel = 2 * math.ceil(2 * sigma) + 1
    return TF.gaussian_blur(images, [kernel, kernel], [sigma, sigma])
