"""Which layers of a model can be visualized, and capturing their activations.

A layer is any named module whose output is a feature map [B, C, H, W] or a vector [B, C],
measured by one dry forward pass; the model's output is the layer `logits`. `capture` hooks
the needed layers for one forward pass and, to save compute, stops the pass right after the
deepest of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from atlas.errors import AtlasError, did_you_mean
from atlas.names import LOGITS


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # without the batch dimension
    channels: int

    def as_dict(self) -> dict:
        return asdict(self)


class _StopForward(Exception):
    """Raised by a hook after the deepest needed layer: the rest of the model is skipped."""


@contextmanager
def capture(
    module: nn.Module, names: Iterable[str], stop_after: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks `names` (modules by dotted name) for the forward passes run inside the block; the
    dict fills with their outputs. Hooks are removed on every exit path."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(module.named_modules())
    handles = []

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            outputs[name] = output
            if name == stop_after:
                raise _StopForward

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


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


def discover(model) -> list[LayerInfo]:
    """Every visualizable layer of a LoadedModel in execution order, then `logits`. Modules
    called more than once per pass (shared activations) are left out: their output is
    ambiguous. So are modules that return their input unchanged (dropout in eval mode)."""
    module = model.module
    seen: dict[str, tuple[str, tuple[int, ...]]] = {}
    calls: dict[str, int] = {}
    handles = []

    def hook_for(name: str):
        def hook(mod, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            is_map = isinstance(output, torch.Tensor) and output.dim() in (2, 4)
            if is_map and not any(output is i for i in inputs):
                seen.setdefault(name, (type(mod).__name__, tuple(output.shape[1:])))

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
    layers = [
        LayerInfo(name, kind, shape, shape[0])
        for name, (kind, shape) in seen.items()
        if calls[name] == 1
    ]
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        layers.append(LayerInfo(LOGITS, "output", tuple(output.shape[1:]), output.shape[1]))
    return layers


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
