"""visualize(): optimize one image per objective, all in one batch.

Every image has its own random stream, seeded from (seed, its objective, its repeat number): its
start image and its transforms are the same whichever units share its batch. The same batch on
the same machine and torch build gives the same bytes; another batch sums its convolutions in
another order, which the optimization carries on, so a unit made in another batch (or alone)
gets another picture that drives it as much (bench/batch_invariance.py).

The model runs in channels_last; on CUDA also under bf16 autocast, and the loop never waits
for the GPU: objective history and best images stay on the device until the end.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from atlas.errors import AtlasError
from atlas.layers import capture, deepest, resolve, run_forward
from atlas.models.loaded import LoadedModel
from atlas.models.plain import wrap
from atlas.optim import transforms
from atlas.optim.device import resolve_device
from atlas.optim.fold import running_module
from atlas.optim.objectives import BatchObjective, Objective, Target, as_objective
from atlas.optim.objectives import diversity as diversity_term
from atlas.optim.param import ImageParam, colour_matrix
from atlas.optim.recipes import Recipe, check_timelapse
from atlas.optim.relu import redirected_relus
from atlas.record import LOGITS


@dataclass
class UnitResult:
    """The outcome for one image: the best image seen (by objective) and how it got there.
    `objective` is the one asked for; a diversity term added by the recipe is not part of it."""

    objective: Objective
    image: np.ndarray  # uint8 [H, W, 3]
    objective_start: float
    objective_final: float
    objective_best: float
    best_step: int
    history: list[float]
    seed: int
    activation: float = float("nan")  # the objective on `image` as stored, without transforms
    frames: list[np.ndarray] = field(default_factory=list)  # uint8, when a timelapse was kept
    start: np.ndarray | None = None  # uint8: the image before the first step

    @property
    def target(self) -> Target | None:
        return self.objective.main_target

    @property
    def id(self) -> str:
        return self.objective.id

    def _repr_png_(self) -> bytes:
        """In Jupyter, a result that is a cell's value shows as its image."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.image).save(buffer, format="PNG")
        return buffer.getvalue()


def image_seed(seed: int, objective: Objective, repeat: int) -> int:
    """A per-image seed that depends on the unit, not on its position in the batch."""
    text = f"{seed}|{objective!r}|{repeat}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def _with_diversity(model, objectives: list[Objective], recipe: Recipe) -> list[Objective]:
    """Adds the recipe's diversity term to every objective that appears more than once. Its
    layer is the recipe's, else the unit's own, else (for logits) the deepest feature map."""
    if recipe.diversity <= 0:
        return objectives
    counts = Counter(objectives)
    deepest_map = next((x.name for x in reversed(model.layers) if len(x.shape) == 3), None)
    result = []
    for objective in objectives:
        if counts[objective] > 1:
            layer = recipe.diversity_layer or min(objective.layers - {LOGITS}, default=deepest_map)
            if layer is None:
                raise AtlasError(f"{model.spec} has no feature map to measure diversity on")
            objective = objective + recipe.diversity * diversity_term(layer)
        result.append(objective)
    return result


def check_targets(model, targets: Sequence[Target | Objective]) -> None:
    """Raise AtlasError for unknown layers and out-of-range units before any work starts."""
    objectives = [as_objective(t) for t in targets]
    needed_layers(model, objectives)
    _check_indices(model, objectives)


def needed_layers(model, objectives: Sequence[Objective]) -> tuple[list[str], str | None]:
    """The hooked layers, and the one after which the forward pass can stop (None: run it all)."""
    names = set().union(*(o.layers for o in objectives))
    for name in names:
        resolve(model, name)
    return sorted(names - {LOGITS}), deepest(model, names)


def _check_indices(model, objectives: Sequence[Objective]) -> None:
    for objective in objectives:
        for _, term in objective.terms:
            if not isinstance(term, Target) or (term.index is None and term.direction is None):
                continue
            layer = resolve(model, term.layer)
            if term.direction is not None and len(term.direction.values) != layer.channels:
                raise AtlasError(
                    f"{term.id} has {len(term.direction.values)} weights but {term.layer} has "
                    f"{layer.channels} channels"
                )
            if term.index is not None and not 0 <= term.index < layer.channels:
                what = "class" if term.layer == LOGITS else "channel"
                raise AtlasError(
                    f"{what} {term.index} is out of range: {term.layer} has "
                    f"{layer.channels} ({what} 0-{layer.channels - 1})"
                )
            height, width = layer.shape[-2:] if len(layer.shape) == 3 else (1, 1)
            box = term.box(height, width)
            if box and not (0 <= box[0] < box[1] <= height and 0 <= box[2] < box[3] <= width):
                raise AtlasError(f"{term.id} lies outside the {height}x{width} map of {term.layer}")


def _penalties(images: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Per-image prior penalties (L1, L2 around grey, total variation)."""
    penalty = torch.zeros(images.shape[0], device=images.device)
    centred = images - 0.5
    if recipe.l1:
        penalty = penalty + recipe.l1 * centred.abs().flatten(1).mean(1)
    if recipe.l2:
        penalty = penalty + recipe.l2 * centred.square().flatten(1).mean(1)
    if recipe.tv:
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
        penalty = penalty + recipe.tv * (dx + dy)
    return penalty


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> uint8 [B, H, W, 3] on the same device."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    return list(_as_uint8(images).cpu().numpy())


def as_model(model: LoadedModel | nn.Module) -> LoadedModel:
    """A LoadedModel as it is; a plain nn.Module wrapped with atlas's defaults (or its
    pretrained_cfg); anything else is a TypeError."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return wrap(model)
    raise TypeError(
        f"visualize takes a torch nn.Module or an atlas.models.LoadedModel, not "
        f"{type(model).__name__}; atlas.models.load('resnet18') loads one by name"
    )


def visualize(
    model: LoadedModel | nn.Module,
    targets: Sequence[Target | Objective],
    recipe: Recipe,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    on_step: Callable[[int, int], None] | None = None,
    timelapse: int = 0,
    streams: Sequence[int] | None = None,
) -> list[UnitResult]:
    """Optimize one image per target in one batch; return the results in the same order.

    `model` is a LoadedModel, or a plain nn.Module read with ImageNet's mean and std at the
    first input size it runs on (its timm-style `pretrained_cfg` when it has one); to say
    otherwise, wrap it: `atlas.models.wrap(module, mean=..., std=..., input_size=...)`.
    Repeating a target K times with `recipe.diversity > 0` gives K diverse images of it.
    `on_step(done, total)` is called after every step. With `timelapse` N > 0, the image is
    also kept as uint8 (on the device) at step 0, every N steps and the last step, in each
    result's `frames`. `streams`, one seed per target, replaces the seeds derived from (seed,
    objective, repeat): images given one stream start from the same image and see the same
    random transforms, whatever their objectives (growth frames)."""
    model = as_model(model)
    if not targets:
        return []
    check_timelapse(recipe, timelapse)
    requested = [as_objective(t) for t in targets]
    objectives = _with_diversity(model, requested, recipe)
    hooked, stop_after = needed_layers(model, objectives)
    _check_indices(model, objectives)
    device = resolve_device(device)
    on_cuda = device.type == "cuda"
    # folded BatchNorm (1.5x) and channels_last (1.2x per step on a 2-core CPU, bench/speed.py)
    module = running_module(model, hooked, with_logits=stop_after is None)
    module = module.to(device, memory_format=torch.channels_last)
    normalize = model.normalize.to(device)

    batch, channels = len(objectives), model.input_channels
    generators = _image_generators(seed, requested, streams)
    stages = recipe.stages()
    total = recipe.steps
    colour = colour_matrix(recipe.colour, channels)

    def new_param(size: int) -> ImageParam:
        return ImageParam(
            batch,
            channels,
            size,
            kind=recipe.param,
            decay=recipe.decay,
            colour=colour,
            squash=recipe.squash,
            contrast=recipe.contrast,
        ).to(device)

    param = new_param(stages[0].size)
    latent = next(iter(param.parameters()))
    noise = torch.stack([torch.randn(latent.shape[1:], generator=g) for g in generators])
    param.initialize(noise.to(device), recipe.init_noise)
    draws = _draws(generators, total, recipe.views).to(device)  # [steps, views * B, draws]

    batch_objective = BatchObjective(objectives)
    history = torch.zeros(total, batch, device=device)
    frames: list[torch.Tensor] = []
    step = 0
    relus = redirected_relus(module) if recipe.redirect_relu else nullcontext()
    with capture(model, hooked, stop_after, module) as acts, relus as redirect:
        for stage_number, stage in enumerate(stages):
            if stage_number:  # upscale the current image into a larger parameterization
                with torch.no_grad():
                    image = transforms.blur(param(), stage.blur[0])
                    image = torch.nn.functional.interpolate(
                        image, size=(stage.size, stage.size), mode="bilinear", align_corners=False
                    )
                param = new_param(stage.size)
                param.encode(image)
            optimizer = _OPTIMIZERS[recipe.optimizer](param.parameters(), lr=stage.lr[0])
            best_value = torch.full((batch,), -torch.inf, device=device)
            best_image = torch.zeros(batch, channels, stage.size, stage.size, device=device)
            for stage_step in range(stage.steps):
                progress = stage_step / max(stage.steps - 1, 1)
                for group in optimizer.param_groups:
                    group["lr"] = _lerp(stage.lr, progress) * recipe.lr_factor(step)
                if redirect is not None:
                    redirect.on = step < recipe.redirect_relu
                images = param()
                if step == 0:
                    start = _as_uint8(images.detach())
                if timelapse and (step % timelapse == 0 or step == total - 1):
                    frames.append(_as_uint8(images.detach()))
                views = images.repeat(recipe.views, 1, 1, 1)
                view = transforms.apply(views, draws[step], recipe, model.input_size, model.resize)
                view = normalize(view)
                view = view.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                    output = run_forward(module, view)
                if output is not None:
                    acts[LOGITS] = output
                values = _mean_over_views(batch_objective, acts, recipe.views, batch)
                loss = (_penalties(images, recipe) - values).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                acts.clear()
                with torch.no_grad():
                    history[step] = values.detach()
                    improved = values.detach() > best_value
                    best_value = torch.where(improved, values.detach(), best_value)
                    best_image = torch.where(
                        improved.view(-1, 1, 1, 1), images.detach(), best_image
                    )
                    if recipe.blur_every and (stage_step + 1) % recipe.blur_every == 0:
                        param.encode(transforms.blur(param(), _lerp(stage.blur, progress)))
                step += 1
                if on_step is not None:
                    on_step(step, total)
        if redirect is not None:
            redirect.on = False
        with torch.no_grad():  # the requested objectives on the images as stored and shown
            shown = normalize(_shown(best_image, model.input_size, model.resize))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                output = run_forward(module, shown.contiguous(memory_format=torch.channels_last))
            if output is not None:
                acts[LOGITS] = output
            clean = BatchObjective(requested)(acts).float()

    final_start = total - stages[-1].steps
    results = _results(requested, history, best_image, final_start, generators)
    for result, value, first in zip(results, clean.tolist(), start.cpu().numpy(), strict=True):
        result.activation = value
        result.start = first
    for frame in frames:  # copied to the host at the end, not inside the loop
        for result, image in zip(results, frame.cpu().numpy(), strict=True):
            result.frames.append(image)
    return results


def _draws(generators: Sequence[torch.Generator], steps: int, views: int) -> torch.Tensor:
    """[steps, views * B, DRAWS_PER_STEP] uniform draws, view-major like the repeated batch.
    The first view's draws come first from each stream, so one view draws what it always did."""
    per_image = []
    for generator in generators:
        first = torch.rand(steps, 1, transforms.DRAWS_PER_STEP, generator=generator)
        more = torch.rand(steps, views - 1, transforms.DRAWS_PER_STEP, generator=generator)
        per_image.append(torch.cat([first, more], dim=1))
    return torch.stack(per_image, dim=2).flatten(1, 2)


def _mean_over_views(
    objective: BatchObjective, acts: dict[str, torch.Tensor], views: int, batch: int
) -> torch.Tensor:
    """Per-image objective values averaged over the views of the image (rows v * B + i)."""
    if views == 1:
        return objective(acts)
    values = [
        objective({k: a[v * batch : (v + 1) * batch] for k, a in acts.items()})
        for v in range(views)
    ]
    return torch.stack(values).mean(0)


def _shown(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """The images as stored (8 bits per channel) and as a reader's model would see them:
    resized to its input as the model's preprocessing resizes, no random transforms."""
    return transforms.resize((images.clamp(0, 1) * 255).round() / 255, size, mode)


def _image_generators(
    seed: int, objectives: Sequence[Objective], streams: Sequence[int] | None = None
) -> list[torch.Generator]:
    """One random stream per image; repeats of one objective get streams 0, 1, 2, ... Given
    `streams`, image i's stream is seeded with streams[i] instead."""
    if streams is not None:
        if len(streams) != len(objectives):
            raise ValueError(f"{len(streams)} streams for {len(objectives)} targets")
        return [torch.Generator().manual_seed(stream) for stream in streams]
    repeats: Counter = Counter()
    generators = []
    for objective in objectives:
        generators.append(
            torch.Generator().manual_seed(image_seed(seed, objective, repeats[objective]))
        )
        repeats[objective] += 1
    return generators


_OPTIMIZERS = {"adam": torch.optim.Adam, "nadam": torch.optim.NAdam}  # both per-element: no
# image's step reads another image's gradients


def _lerp(pair: tuple[float, float], progress: float) -> float:
    return pair[0] + (pair[1] - pair[0]) * progress


def _results(
    objectives: Sequence[Objective],
    history: torch.Tensor,
    best_image: torch.Tensor,
    final_start: int,
    generators: Sequence[torch.Generator],
) -> list[UnitResult]:
    """Copies everything to the host once. The best image is taken from the final stage (the
    earlier octaves have smaller images)."""
    curves = history.T.cpu().numpy().astype(float)
    images = _to_uint8(best_image)
    results = []
    for i, objective in enumerate(objectives):
        curve = curves[i]
        best_step = final_start + int(np.argmax(curve[final_start:]))
        results.append(
            UnitResult(
                objective=objective,
                image=images[i],
                objective_start=float(curve[0]),
                objective_final=float(curve[-1]),
                objective_best=float(curve[best_step]),
                best_step=best_step,
                history=curve.tolist(),
                seed=generators[i].initial_seed(),
            )
        )
    return results
