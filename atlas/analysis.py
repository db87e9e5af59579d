"""What a unit is for, measured on its own images after the optimization: which channels of the
layer before drive it (circuits), which classes it pushes (class effects), and where it fires
(activation maps on the starting and the best image).

Both link measures are gradient x activation, summed over positions, read as the derivative of
one quantity with respect to a per-channel gain held at 1 (`layers.gained`):

    input weight of channel c of layer P = d unit / d gain_P[c]     (one backward pass)
    effect on class k                    = d logit_k / d gain_L[u]  (a central difference)

so a layer between the two is no obstacle, and a negative weight inhibits. Each is averaged
over the unit's K images. The cost is a few passes per task, against hundreds of steps.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from atlas.activations import model_inputs
from atlas.layers import capture, gained, module_device, resolve, run_forward, steered
from atlas.optim.objectives import BatchObjective, Target, as_objective, direction_values
from atlas.record import LOGITS

INPUTS_KEPT = 16  # strongest inputs of each sign (pages show 6 and 3; outputs are derived)
CLASSES_KEPT = 5  # classes pushed up most, and down most
EFFECT_STEP = 0.05  # the relative gain change of the central difference
MAP_SCALE = 160  # px: the longer side of each activation map as stored
MAP_GAP = 6  # px between the two maps
GAP_GREY = (32, 34, 38)  # neither end of the colour scale


@dataclass
class UnitAnalysis:
    inputs: tuple[tuple[int, float], ...] = ()  # (channel of the layer before, weight)
    classes: tuple[tuple[int, float], ...] = ()  # (class, effect): up first, then down
    maps: bytes | None = None  # WebP: the map on the starting image | on the best image
    map_range: tuple[float, float] | None = None  # the maps' shared colour scale


def strongest(weights: np.ndarray, kept: int) -> tuple[tuple[int, float], ...]:
    """The `kept` largest positive weights, then the `kept` most negative, strongest first."""
    order = np.argsort(weights)
    up = [i for i in order[::-1][:kept] if weights[i] > 0]
    down = [i for i in order[:kept] if weights[i] < 0]
    return tuple((int(i), round(float(weights[i]), 6)) for i in [*up, *down])


def input_weights(model, targets: Sequence[Target], images, inputs_from: str) -> np.ndarray:
    """[B, C] attribution of each image's target to the channels of `inputs_from`."""
    x = model_inputs(model, images, module_device(model.module))
    layer = resolve(model, inputs_from)
    gains = torch.ones(len(images), layer.channels, requires_grad=True, device=x.device)
    hooked = sorted({t.layer for t in targets} - {LOGITS})
    with gained(model, inputs_from, gains), capture(model, hooked) as acts:
        output = run_forward(model.module, x)
        acts[LOGITS] = output
        values = BatchObjective([as_objective(t) for t in targets])(acts)
    (grad,) = torch.autograd.grad(values.sum(), gains)
    return grad.numpy()


def class_effects(model, targets: Sequence[Target], images) -> np.ndarray:
    """[B, classes]: d logits / d gain of each image's own unit (its target's), by a central
    difference around gain 1: the gain of a channel, or along a direction (a concept, a
    cell: every position's component along it)."""
    x = model_inputs(model, images, module_device(model.module))
    logits = []
    with torch.no_grad():
        for sign in (1, -1):
            with _turned_up(model, targets, sign * EFFECT_STEP, x.device):
                logits.append(model.module(x).float())
    return ((logits[0] - logits[1]) / (2 * EFFECT_STEP)).numpy()


def _turned_up(model, targets: Sequence[Target], step: float, device: torch.device):
    """The block in which each image's unit is turned up by the relative `step`."""
    layer = targets[0].layer
    if targets[0].kind == "direction":
        return steered(model, layer, _directions(targets).to(device), step)
    gains = torch.ones(len(targets), resolve(model, layer).channels, device=device)
    gains[torch.arange(len(targets)), torch.tensor([t.index for t in targets])] += step
    return gained(model, layer, gains)


def _directions(targets: Sequence[Target]) -> torch.Tensor:
    """[B, C]: each direction target's unit-norm weights."""
    weights = torch.tensor([t.direction.values for t in targets], dtype=torch.float32)
    return torch.nn.functional.normalize(weights, dim=1)


def channel_maps(model, targets: Sequence[Target], images) -> np.ndarray:
    """[B, H, W]: each image's target over the map: its channel, or its direction's objective
    at each position."""
    x = model_inputs(model, images, module_device(model.module))
    layer = targets[0].layer
    with torch.no_grad(), capture(model, [layer], stop_after=layer) as acts:
        run_forward(model.module, x)
    found = acts[layer].float()
    if targets[0].kind == "direction":
        powers = torch.tensor([t.direction.power for t in targets], device=found.device)
        return direction_values(found, _directions(targets).to(found.device), powers).numpy()
    return found[torch.arange(len(targets)), torch.tensor([t.index for t in targets])].numpy()


def map_image(before: np.ndarray, after: np.ndarray) -> tuple[bytes, tuple[float, float]]:
    """The two maps side by side on one colour scale (dark low, bright high), MAP_GAP px of
    the page's grey between them, as lossless WebP. (A unit whose optimization became NaN
    fails; its maps are drawn as zeros here and never stored.)"""
    before, after = np.nan_to_num(before), np.nan_to_num(after)
    low, high = float(min(before.min(), after.min())), float(max(before.max(), after.max()))
    span = (high - low) or 1.0
    height, width = before.shape
    scale = max(1, MAP_SCALE // max(height, width))
    size = (width * scale, height * scale)
    canvas = Image.new("RGB", (2 * size[0] + MAP_GAP, size[1]), GAP_GREY)
    for column, values in enumerate((before, after)):
        tile = Image.fromarray(colour_ramp((values - low) / span)).resize(
            size, Image.Resampling.NEAREST
        )
        canvas.paste(tile, (column * (size[0] + MAP_GAP), 0))
    encoded = io.BytesIO()
    canvas.save(encoded, format="WEBP", lossless=True)
    return encoded.getvalue(), (round(low, 5), round(high, 5))


def colour_ramp(level: np.ndarray) -> np.ndarray:
    """A dark-blue to yellow ramp (readable, and monotone in brightness)."""
    stops = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]])
    position = np.clip(level, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    fraction = (position - low)[..., None]
    return (stops[low] * (1 - fraction) + stops[low + 1] * fraction).astype(np.uint8)


def analyse(
    model, targets: Sequence[Target], images, starts, samples: int, inputs_from: str | None
) -> list[UnitAnalysis]:
    """One UnitAnalysis per unit of a task: `targets`, `images` and `starts` hold K = `samples`
    consecutive entries per unit (the first is the unit's main image)."""
    units = len(targets) // samples
    analyses = [UnitAnalysis() for _ in range(units)]
    per_unit = slice(None, None, samples)
    layer = targets[0].layer

    def mean_per_unit(values: np.ndarray) -> np.ndarray:
        return values.reshape(units, samples, -1).mean(1)

    if inputs_from is not None:
        weights = mean_per_unit(input_weights(model, targets, images, inputs_from))
        for analysis, row in zip(analyses, weights, strict=True):
            analysis.inputs = strongest(row, INPUTS_KEPT)
    if layer == LOGITS or targets[0].kind == "layer":  # a class, or a whole layer
        return analyses
    effects = mean_per_unit(class_effects(model, targets, images))
    for analysis, row in zip(analyses, effects, strict=True):
        analysis.classes = strongest(row, CLASSES_KEPT)
    if len(resolve(model, layer).shape) == 3:
        main = list(targets[per_unit])
        before = channel_maps(model, main, list(starts[per_unit]))
        after = channel_maps(model, main, list(images[per_unit]))
        for analysis, pair in zip(analyses, zip(before, after, strict=True), strict=True):
            analysis.maps, analysis.map_range = map_image(*pair)
    return analyses


# --- on the unit's exemplars too: the same measures, averaged over more natural images -------


@dataclass(frozen=True)
class EvidenceTask:
    """One unit's images for its inputs and class effects: its K pictures (as stored) and
    its exemplars' source images, as bytes (workers need no access to OUT or the folder).
    `layer` and `index` name the unit (a concept's: its learned layer), `target` is what its
    pictures maximize."""

    layer: str
    index: int
    target: Target
    inputs_from: str | None
    blobs: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return f"evidence-{self.layer}-{self.index}"


def evidence_task(model, task: EvidenceTask) -> dict:
    """The unit's inputs and class effects, averaged over every image of the task that
    decodes; `images` says how many."""
    from atlas.exemplars import decode, fit_settings  # a file as the exemplar pass shows it

    pixels, kept = decode(task.blobs, *fit_settings(model))
    images = list(pixels.to(module_device(model.module)))
    result: dict = {"images": len(kept), "inputs": (), "classes": ()}
    if not images:
        return result
    targets = [task.target] * len(images)
    if task.inputs_from is not None:
        weights = input_weights(model, targets, images, task.inputs_from).mean(0)
        result["inputs"] = strongest(weights, INPUTS_KEPT)
    if task.layer != LOGITS:
        result["classes"] = strongest(class_effects(model, targets, images).mean(0), CLASSES_KEPT)
    return result
