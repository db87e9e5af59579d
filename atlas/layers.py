"""Which layers of a model can be visualized, and capturing their activations.

A layer is any named module whose output is a feature map, channels first or last, a sequence
of patch tokens, or a vector, measured by one dry forward pass (atlas.layout reads which);
the model's output is the layer `logits`, and each token layer led by a class token also
offers that token alone as the layer `<name>.cls`. Every consumer sees a layer as [B, C, H, W]
(or [B, C]): `capture` hooks the needed layers for one forward pass, hands out their outputs
in that form and, to save compute, stops the pass right after the deepest of them.

A layer that ends in a clamp with an upper bound (ReLU6, as in EfficientNet-Lite's stem and
head) is read before that clamp: maximized after it, every position of a channel reaches 6
within a few dozen steps, the gradient vanishes and the image stops improving (the stored
best image of each of Lite0's first 8 head channels came from steps 16-48 of 128). The clamp
is monotonic, so the unit that is maximized is the same; only its saturation is gone. The
clamp module itself (`head.2`) is read as it is: the way to ask for the saturated values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from atlas.errors import AtlasError, did_you_mean
from atlas.layout import Layout, Producer, is_ambiguous, layout_of, producer_of
from atlas.record import LOGITS

CLASS_TOKEN = "cls"  # `<token layer>.cls`: the class token of a token layer


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # as consumers see it, without the batch: (C, H, W) or (C,)
    channels: int
    # the saturating clamp that ends the layer, whose input objectives read instead (ReLU6)
    pre_activation: str | None = None
    kind: str = ""  # atlas.layout.KINDS; "" means map or vector, by the shape
    prefix: int = 0  # tokens: class and register tokens ahead of the patch grid
    module: str | None = None  # the module read, when not `name` (a class token's layer)

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", "map" if len(self.shape) == 3 else "vector")

    @property
    def layout(self) -> Layout:
        return Layout(
            self.kind, self.prefix, tuple(self.shape[1:]) if self.kind == "tokens" else (0, 0)
        )

    @property
    def source(self) -> str:
        """What the units of this layer read, for content keys: the layer's output, or the
        input of the clamp that ends it, and how it is laid out when not as a plain map or
        vector (so the keys of maps and vectors stored before layouts stay valid)."""
        source = self.name if self.pre_activation is None else f"{self.name}<{self.pre_activation}"
        return source if self.kind in ("map", "vector") else f"{source}[{self.kind}]"

    def as_dict(self) -> dict:
        return asdict(self)


class _StopForward(Exception):
    """Raised by a hook after the deepest needed layer: the rest of the model is skipped."""


@contextmanager
def capture(
    model, names: Iterable[str], stop_after: str | None = None, module: nn.Module | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks the layers `names` of `model` (a LoadedModel) for the forward passes run inside
    the block; the dict fills with their outputs as [B, C, H, W] or [B, C] (for a layer that
    ends in a saturating clamp, with that clamp's input). `module` is what runs when not
    `model.module` itself (a folded copy, whose names are the same). Hooks are removed on
    every exit path."""
    module = model.module if module is None else module
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(module.named_modules())
    infos = {layer.name: layer for layer in model.layers}
    # one hook per module: `head` and `head.2` both hook `head.2`, one reading its input and
    # the other its output, and whichever is `stop_after` must not cut the other short
    readers: dict[str, dict[str, tuple[bool, Layout]]] = {}  # module -> {layer: (input?, how)}
    for name in names:
        info = infos.get(name)
        clamp = info.pre_activation if info else None
        hooked = clamp or (info.module if info and info.module else name)
        readers.setdefault(hooked, {})[name] = (clamp is not None, _layout(info))
    handles = []

    def hook_for(reads: dict[str, tuple[bool, Layout]]):
        def hook(_module, inputs, output):
            for name, (before, layout) in reads.items():
                outputs[name] = layout.read(inputs[0] if before else output)
            if stop_after in reads:
                raise _StopForward

        return hook

    try:
        for target, reads in readers.items():
            handles.append(modules[target].register_forward_hook(hook_for(reads)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edited(
    model, name: str, edit: Callable[[Layout, torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the layer `name`'s output by edit(its layout, output) in the forward passes run
    inside the block (what `capture` reads for it is edited too)."""
    modules = dict(model.module.named_modules())
    info = {layer.name: layer for layer in model.layers}[name]
    layout = _layout(info)
    if info.pre_activation:  # the layer is read before its clamp: edit the clamp's input
        handle = modules[info.pre_activation].register_forward_pre_hook(
            lambda _module, inputs: (edit(layout, inputs[0]), *inputs[1:])
        )
    else:
        handle = modules[info.module or name].register_forward_hook(
            lambda _module, _inputs, output: edit(layout, output)
        )
    try:
        yield
    finally:
        handle.remove()


def gained(model, name: str, gains: torch.Tensor) -> AbstractContextManager[None]:
    """Multiply the layer `name`'s channels by `gains` [B, C] in the forward passes run inside
    the block (what `capture` reads for it is scaled too). With gains of 1 that require grad,
    d(objective)/d(gain) is each channel's attribution (gradient x activation summed over
    positions); with 1 +- eps on one channel, a finite difference of that channel's effect."""
    return edited(model, name, lambda layout, output: layout.scale(output, gains))


def steered(
    model, name: str, directions: torch.Tensor, step: float
) -> AbstractContextManager[None]:
    """Move each image's activation at every position along its unit-norm direction [B, C] by
    `step` times its own component there (a -> a + step (a . d) d): a gain along the
    direction, as `gained` is one along a channel; with +-eps, a finite difference of what
    turning the direction up does."""

    def steer(layout: Layout, output: torch.Tensor) -> torch.Tensor:
        acts = layout.read(output)
        along = directions.view(*directions.shape, *(1,) * (acts.dim() - 2))
        return layout.add(output, step * (acts * along).sum(1, keepdim=True) * along)

    return edited(model, name, steer)


def _layout(info: LayerInfo | None) -> Layout:
    return info.layout if info is not None else Layout("map")


def clamp_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The clamp a ReLU-like module applies, or None for any other module."""
    if isinstance(module, nn.ReLU):
        return 0.0, math.inf
    if isinstance(module, nn.Hardtanh) and module.min_val == 0:  # ReLU6 is Hardtanh(0, 6)
        return 0.0, float(module.max_val)
    return None


def _saturates(module: nn.Module) -> bool:
    clamp = clamp_bounds(module)
    return clamp is not None and math.isfinite(clamp[1])


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for a module without any)."""
    return next(iter(module.parameters()), torch.empty(0)).device


def run_forward(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
    """The model's output, or None when a capture hook stopped the pass early."""
    try:
        return module(inputs)
    except _StopForward:
        return None


def deepest(model, names: Iterable[str]) -> str | None:
    """The layer of `names` after which a forward pass can stop (None: `logits` is needed,
    so the whole model runs)."""
    names = set(names)
    if LOGITS in names or not names:
        return None
    order = [layer.name for layer in model.layers]
    return max(names, key=order.index)


class _ClampTracker:
    """Follows, in the dry pass, which modules return exactly the output of a saturating clamp
    inside them, untouched since: no in-place op on that output before the module returned,
    nor on the clamp's input before the pass ended (the input is what gets read)."""

    def __init__(self) -> None:
        self.clamps: dict[str, tuple] = {}  # name -> (input, its version, output, its version)
        self.outputs: dict[str, tuple[int, int]] = {}  # name -> (id, version) of its output

    def record(self, name: str, module: nn.Module, inputs: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            return
        self.outputs[name] = (id(output), output._version)  # clamp outputs stay referenced
        if _saturates(module) and inputs and isinstance(inputs[0], torch.Tensor):
            self.clamps[name] = (inputs[0], inputs[0]._version, output, output._version)

    def ending_clamp(self, name: str, usable: Iterable[str]) -> str | None:
        """The clamp strictly inside `name` whose untouched output is `name`'s output. A clamp
        module itself is read as it is: that is the way to ask for the saturated values."""
        for clamp in usable:
            if not clamp.startswith(name + "."):
                continue
            given, given_version, result, result_version = self.clamps[clamp]
            returned = self.outputs.get(name) == (id(result), result_version)
            if returned and given._version == given_version:
                return clamp
        return None


def discover(model) -> list[LayerInfo]:
    """Every visualizable layer of a LoadedModel in execution order, then `logits`. Modules
    called more than once per pass (shared activations) are left out: their output is
    ambiguous. So are modules that return their input unchanged (dropout in eval mode) and
    outputs that are no map, token sequence or vector (windows of a partitioned map)."""
    module = model.module
    seen: dict[str, tuple[str, tuple[int, ...], Producer | None]] = {}
    calls: dict[str, int] = {}
    clamps = _ClampTracker()
    last_producer: list[Producer | None] = [None]
    handles = []

    def hook_for(name: str):
        def hook(mod, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            clamps.record(name, mod, inputs, output)
            last_producer[0] = producer_of(mod) or last_producer[0]
            if not isinstance(output, torch.Tensor) or output.dim() not in (2, 3, 4):
                return
            if output.shape[0] != 1:  # windows of the image folded into the batch, not a layer
                return
            if any(output is i for i in inputs) or name in seen:
                return
            seen[name] = (type(mod).__name__, tuple(output.shape[1:]), last_producer[0])

        return hook

    device = module_device(module)
    dry = torch.zeros(1, model.input_channels, *model.input_size, device=device)
    try:
        if model.hookable:
            for name, mod in module.named_modules():
                if name:
                    handles.append(mod.register_forward_hook(hook_for(name)))
        with torch.no_grad():
            output = module(model.normalize.to(device)(dry))
    except Exception as error:
        raise AtlasError(
            f"{model.spec} failed on a {model.input_channels}x{model.input_size[0]}x"
            f"{model.input_size[1]} input: {str(error).splitlines()[0]}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    usable = [name for name in clamps.clamps if calls[name] == 1]
    ambiguous = [
        name
        for name, (_, raw, _) in seen.items()
        if calls[name] == 1 and is_ambiguous(raw, model.input_size)
    ]
    taller = _taller_outputs(model, ambiguous) if ambiguous else {}
    layers = []
    for name, (type_name, raw, producer) in seen.items():
        layout = (
            None
            if calls[name] != 1
            else layout_of(raw, producer, model.input_size, taller.get(name))
        )
        if layout is None:
            continue
        shape = layout.shape(raw)
        clamp = clamps.ending_clamp(name, usable)
        layers.append(
            LayerInfo(name, type_name, shape, shape[0], clamp, layout.kind, layout.prefix)
        )
        if layout.kind == "tokens" and layout.prefix and f"{name}.{CLASS_TOKEN}" not in calls:
            cls = f"{name}.{CLASS_TOKEN}"
            layers.append(
                LayerInfo(
                    cls,
                    f"class token of {type_name}",
                    shape[:1],
                    shape[0],
                    clamp,
                    "cls_token",
                    module=name,
                )
            )
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        layers.append(LayerInfo(LOGITS, "output", tuple(output.shape[1:]), output.shape[1]))
    return layers


def _taller_outputs(model, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The output shapes of `names` for an input a quarter taller, where the model runs on one
    (models built for one size do not): the axis that grows is the height."""
    height, width = model.input_size
    taller = (height + max(16, -(-height // 4 // 16) * 16), width)
    modules = dict(model.module.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, output) -> None:
            shapes.setdefault(name, tuple(output.shape[1:]))

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    device = module_device(model.module)
    try:
        with torch.no_grad():
            model.module(
                model.normalize.to(device)(
                    torch.zeros(1, model.input_channels, *taller, device=device)
                )
            )
    except Exception:  # a model built for one input size: decide without it
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def resolve(model, name: str) -> LayerInfo:
    """The layer called `name`, or an AtlasError naming the closest layers."""
    for layer in model.layers:
        if layer.name == name:
            return layer
    names = [layer.name for layer in model.layers]
    hint = did_you_mean(name, names)
    if not model.hookable:
        hint += "; TorchScript models expose only `logits`"
    raise AtlasError(f"{model.spec} has no layer {name!r}{hint}")


def glob_regex(pattern: str) -> re.Pattern:
    """Globs over dotted names: `*` and `?` stay within one name part, `**` crosses parts, so
    `blocks.*` is the blocks themselves and `blocks.**` everything inside them."""
    parts = re.split(r"(\*\*|\*|\?|\[[^\]]*\])", pattern)
    regex = ""
    for part in parts:
        if part == "**":
            regex += ".*"
        elif part == "*":
            regex += r"[^.]*"
        elif part == "?":
            regex += r"[^.]"
        elif part.startswith("[") and part.endswith("]") and len(part) > 2:
            regex += "[" + ("^" + part[2:-1] if part[1] == "!" else part[1:-1]) + "]"
        else:
            regex += re.escape(part)
    return re.compile(regex + r"\Z")


def select(model, patterns: Iterable[str]) -> list[LayerInfo]:
    """Layers matching any of the globs (or exact names), in execution order."""
    compiled = {pattern: glob_regex(pattern) for pattern in patterns}
    for pattern, regex in compiled.items():
        if not any(regex.match(layer.name) for layer in model.layers):
            if not any(ch in pattern for ch in "*?["):
                resolve(model, pattern)  # raises with suggestions
            raise AtlasError(f"no layer of {model.spec} matches {pattern!r}")
    return [
        layer
        for layer in model.layers
        if any(regex.match(layer.name) for regex in compiled.values())
    ]
