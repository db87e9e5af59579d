"""Measures of how good a feature visualization is (issue 6), for benchmarks and unit pages.

A visualization can excite its unit and still be useless: adversarial noise does that. Three
measures separate the two, each comparable across recipes and against natural images:

- transfer: a class visualization that other models classify as the class shows the class,
  not a quirk of one network (`transfer_scores`);
- activation ratio: the unit's activation on its visualization over its highest activation on
  natural images, a scale that means the same for every unit (`activation_ratios`);
- high-frequency share: how much of an image's energy is in fine detail; noise scores high,
  photos low (`high_frequency_share`); with the share of clipped pixels (`clipped_share`),
  which catches blown-out images that the spectrum calls smooth.

Every activation here is "clean": the image resized to the model's input with antialiasing,
normalized, and shown once with none of the optimization's random transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from atlas.layers import capture, module_device, run_forward
from atlas.names import LOGITS
from atlas.optim.loop import check_targets, needed_layers
from atlas.optim.objectives import BatchObjective, Objective, Target, as_objective
from atlas.optim.transforms import resize

Image = np.ndarray | torch.Tensor
"""uint8 (or float in [0, 1]) numpy [H, W, 3] or [H, W], or a float tensor [C, H, W] in [0, 1]."""

HIGH_FREQUENCY_CUTOFF = 0.25
"""Cycles per pixel: half the Nyquist frequency (0.5). Detail finer than a 4-pixel period."""


def to_tensor(image: Image) -> torch.Tensor:
    """A float [C, H, W] tensor in [0, 1], whichever of the accepted forms `image` is in."""
    if isinstance(image, torch.Tensor):
        return image.detach().float()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
    return tensor / 255 if array.dtype == np.uint8 else tensor


def high_frequency_share(image: Image, cutoff: float = HIGH_FREQUENCY_CUTOFF) -> float:
    """Share of the image's spectral energy above `cutoff` cycles per pixel (radially).

    The image is turned grey (channel mean), its mean removed, and multiplied by a Hann window
    so that the jump between opposite borders of a non-periodic image (which the FFT sees as
    periodic) does not count as detail. White noise scores about 0.8 at the default cutoff
    (the share of the frequency square outside a circle of radius 0.25); photos score a few
    per cent. Returns 0 for a flat image."""
    grey = to_tensor(image).double().mean(0)
    grey = grey - grey.mean()
    height, width = grey.shape
    window = torch.outer(
        torch.hann_window(height, periodic=False, dtype=grey.dtype),
        torch.hann_window(width, periodic=False, dtype=grey.dtype),
    )
    power = torch.fft.fft2(grey * window).abs().square()
    fy = torch.fft.fftfreq(height, dtype=grey.dtype)[:, None]
    fx = torch.fft.fftfreq(width, dtype=grey.dtype)[None, :]
    radius = torch.sqrt(fy.square() + fx.square())
    total = float(power.sum())
    return float(power[radius > cutoff].sum()) / total if total > 0 else 0.0


CLIPPED = 3 / 255  # within 3 levels of black or white in 8 bits


def clipped_share(image: Image) -> float:
    """Share of pixel values at (or within 3 levels of) black or white: blown-out highlights
    and crushed shadows, which a spectrum measure does not see (flat white areas have no high
    frequencies). Photos and good visualizations score near 0."""
    values = to_tensor(image)
    return float(((values <= CLIPPED) | (values >= 1 - CLIPPED)).float().mean())


def model_inputs(model, images: Sequence[Image], device: torch.device) -> torch.Tensor:
    """What the model sees for each image: resized as its preprocessing says, its channel count,
    normalized. A 3-channel image shown to a grey model is averaged to grey."""
    views = []
    for image in images:
        view = to_tensor(image).to(device)[None]
        if view.shape[1] != model.input_channels:
            view = view.mean(1, keepdim=True).expand(-1, model.input_channels, -1, -1)
        views.append(resize(view, model.input_size, model.resize))
    return model.normalize.to(device)(torch.cat(views).clamp(0, 1))


def for_each_batch(
    model,
    objectives: Sequence[Objective],
    images: Sequence[Image],
    batch_size: int,
    consume: Callable[[int, dict[str, torch.Tensor]], None],
) -> None:
    """Calls `consume(first row, activations)` for consecutive batches of `images`, with only
    the layers the objectives need hooked and the forward pass stopped after the deepest."""
    hooked, stop_after = needed_layers(model, objectives)
    device = module_device(model.module)
    with torch.no_grad(), capture(model, hooked, stop_after) as acts:
        for first in range(0, len(images), batch_size):
            batch = model_inputs(model, images[first : first + batch_size], device)
            output = run_forward(model.module, batch)
            if output is not None:
                acts[LOGITS] = output
            consume(first, acts)
            acts.clear()


def clean_activations(
    model,
    objectives: Sequence[Target | Objective],
    images: Sequence[Image],
    *,
    batch_size: int = 16,
) -> list[float]:
    """Each objective's value on its own image (`objectives[i]` on `images[i]`): the unit's
    activation on an image as a reader would see it, without the optimization's transforms."""
    if len(objectives) != len(images):
        raise ValueError(f"{len(objectives)} objectives but {len(images)} images")
    wanted = [as_objective(o) for o in objectives]
    check_targets(model, wanted)
    values: list[float] = []

    def consume(first: int, acts: dict[str, torch.Tensor]) -> None:
        count = next(iter(acts.values())).shape[0]
        values.extend(BatchObjective(wanted[first : first + count])(acts).tolist())

    for_each_batch(model, wanted, images, batch_size, consume)
    return values


def activation_grid(
    model,
    objectives: Sequence[Target | Objective],
    images: Sequence[Image],
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """Every objective on every image, [len(images), len(objectives)], with one forward pass
    per image (not one per pair): what the maxima over a natural-image set need."""
    wanted = [as_objective(o) for o in objectives]
    check_targets(model, wanted)
    evaluate = BatchObjective(wanted)
    rows: list[np.ndarray] = []

    def consume(_first: int, acts: dict[str, torch.Tensor]) -> None:
        for i in range(next(iter(acts.values())).shape[0]):
            # image i's activations, repeated once for every objective (a view, not a copy)
            one = {name: a[i : i + 1].expand(len(wanted), *a.shape[1:]) for name, a in acts.items()}
            rows.append(evaluate(one).cpu().numpy())

    for_each_batch(model, wanted, images, batch_size, consume)
    return np.stack(rows) if rows else np.zeros((0, len(wanted)))


def activation_ratio(visualization: float, natural_maximum: float) -> float:
    """The visualization's activation over the unit's maximum on natural images; NaN when
    that maximum is not positive (the ratio would not mean "more than any photo")."""
    return visualization / natural_maximum if natural_maximum > 0 else float("nan")


def activation_ratios(
    model,
    objectives: Sequence[Target | Objective],
    visualizations: Sequence[Image],
    natural: Sequence[Image],
) -> list[float]:
    """`activation_ratio` of each objective's visualization against `natural` images. Above 1:
    the visualization drives the unit harder than any of the natural images."""
    own = clean_activations(model, objectives, visualizations)
    maxima = activation_grid(model, objectives, natural).max(axis=0)
    return [activation_ratio(v, float(m)) for v, m in zip(own, maxima, strict=True)]


@dataclass(frozen=True)
class Transfer:
    """How a judging model classifies one class visualization."""

    top1: bool  # the class is the judge's first choice
    top5: bool  # the class is among its five first choices
    probability: float  # the judge's softmax probability of the class


def class_probabilities(model, images: Sequence[Image], *, batch_size: int = 16) -> torch.Tensor:
    """The model's softmax over its classes for each image, [len(images), classes], on the CPU."""
    device = module_device(model.module)
    chunks = []
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            logits = model.module(model_inputs(model, images[first : first + batch_size], device))
            chunks.append(logits.float().softmax(1).cpu())
    return torch.cat(chunks)


def transfer_scores(judge, images: Sequence[Image], classes: Sequence[int]) -> list[Transfer]:
    """How `judge` (another LoadedModel with the same classes) classifies each image meant to
    show `classes[i]`: recognizable images transfer, adversarial noise does not."""
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} classes")
    probabilities = class_probabilities(judge, images)
    top5 = probabilities.topk(min(5, probabilities.shape[1]), dim=1).indices
    return [
        Transfer(
            top1=int(top5[i, 0]) == c,
            top5=c in top5[i].tolist(),
            probability=float(probabilities[i, c]),
        )
        for i, c in enumerate(classes)
    ]
