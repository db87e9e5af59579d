"""A unit's activation on an image as a reader would see it: the image resized to the model's
input as its preprocessing says (with antialiasing), normalized, and shown once with none of the
optimization's random transforms ("clean"). The analyses, the change score, `atlas compare` and
the quality measures all read activations this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from atlas.layers import capture, module_device, run_forward
from atlas.optim.loop import check_targets, needed_layers
from atlas.optim.objectives import BatchObjective, Objective, Target, as_objective
from atlas.optim.transforms import resize
from atlas.record import LOGITS

Image = np.ndarray | torch.Tensor
"""uint8 (or float in [0, 1]) numpy [H, W, 3] or [H, W], or a float tensor [C, H, W] in [0, 1]."""


def to_tensor(image: Image) -> torch.Tensor:
    """A float [C, H, W] tensor in [0, 1], whichever of the accepted forms `image` is in."""
    if isinstance(image, torch.Tensor):
        return image.detach().float()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
    return tensor / 255 if array.dtype == np.uint8 else tensor


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
