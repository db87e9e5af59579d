"""The layers an atlas shows when none are chosen: the model's main path, as a reader names it.

One rule for every architecture, measured by one dry forward pass with gradients:

1. The main path starts as the model itself and is refined a level at a time: each module on
   it that is a *chain* (its submodules run one after another, each fed by the one before and
   nothing skipping past them: a Sequential, ViT's encoder, a stage of blocks) is replaced by
   those submodules, until the path shows at least MIN_LAYERS layers. A residual or
   multi-branch block is no chain, so it stays whole (ResNet's bottlenecks, Inception's mixed
   blocks, Swin's and ViT's transformer blocks); so does a chain of plain modules that shows
   one layer (a conv, its norm and activation: EfficientNet-Lite's `stem`).
2. Along the path, a module that mixes features (any module with weights but a norm) starts a
   *run*, and the parameter-free modules and norms after it join the run: one layer is shown
   per run, the output after its last activation before any pooling (VGG's conv layers after
   their ReLU) or, after a lone convolution, after its norm (what the network passes on; a
   negative BatchNorm scale would flip the unit), else the mixing module itself (a block
   followed by the model's final norm). So a BatchNorm or activation that repeats the same
   tensor is never shown twice, and pooling over the last map never.

So VGG16 shows its 13 conv layers after their ReLU, ResNet-50 its stem and 16 bottlenecks,
ViT-B/16 its patch embedding and 12 encoder blocks, Swin-T its patch embedding, 4 stages and
3 patch mergings, and EfficientNet-Lite0 `stem`, `blocks.0-15` and `head`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from atlas.errors import AtlasError, describe
from atlas.layers import module_device

MIN_LAYERS = 8  # refine the path while it shows fewer layers than this (stages -> blocks)

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass
class _Call:
    """One module's single call in the dry pass."""

    module: nn.Module
    steps: list[str] = field(default_factory=list)  # its direct submodule calls, in order
    given: object = None  # grad_fn node of its input
    returned: object = None  # grad_fn node of its output
    calls: int = 0


def _is_activation(module: nn.Module) -> bool:
    activation = type(module).__module__ == "torch.nn.modules.activation"
    return activation and not isinstance(module, nn.MultiheadAttention)


def _mixes(module: nn.Module) -> bool:
    """Whether a module can combine features: it has weights and is no norm or activation."""
    if isinstance(module, _NORMS) or _is_activation(module):
        return False
    return any(True for _ in module.parameters())


def _node(value: object) -> object:
    """The autograd node of a module's input or output: the tensor itself, the first of a
    tuple (nested ones too: PVTv2's stages return ((hidden,), height, width)), or the last
    tensor of a mapping (a transformers ModelOutput: its pooled output when it has one, which
    is what the classifier reads, else its last hidden state)."""
    if isinstance(value, Mapping):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        value = tensors[-1] if tensors else None
    while isinstance(value, tuple | list) and value:
        value = value[0]
    return value.grad_fn if isinstance(value, torch.Tensor) else None


class _Trace:
    """Calls, nesting and autograd nodes of every module in one forward pass."""

    def __init__(self, model) -> None:
        self.calls: dict[str, _Call] = {}
        stack: list[str] = []
        module = model.module
        handles = []

        def before(name: str):
            def hook(mod, inputs, keywords):
                call = self.calls.setdefault(name, _Call(mod))
                call.calls += 1
                if stack:
                    self.calls[stack[-1]].steps.append(name)
                stack.append(name)
                # transformers passes its inputs by keyword (`pixel_values=`)
                call.given = _node(inputs or tuple(keywords.values()))

            return hook

        def after(name: str):
            def hook(mod, inputs, output):
                stack.pop()
                self.calls[name].returned = _node(output)

            return hook

        for name, mod in module.named_modules():
            handles.append(mod.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(after(name)))
        device = module_device(module)
        grey = torch.full((1, model.input_channels, *model.input_size), 0.5, device=device)
        image = grey.requires_grad_(True).clone()  # not a leaf: its input node is never None
        try:
            with torch.enable_grad():
                self.output = module(model.normalize.to(device)(image))
        except Exception as error:
            raise AtlasError(
                f"{model.spec} failed with gradients on (finding its main path): {describe(error)}"
            ) from error
        finally:
            for handle in handles:
                handle.remove()

    def steps(self, name: str) -> list[str]:
        call = self.calls.get(name)
        return call.steps if call is not None else []

    def is_chain(self, name: str) -> bool:
        """Whether `name`'s direct submodules each ran once, each fed by the one before and
        nothing reaching past them from its input or from earlier ones (no skip, no branch)."""
        call = self.calls[name]
        steps = [self.calls[step] for step in call.steps]
        if call.calls != 1 or not steps or any(s.calls != 1 for s in steps):
            return False
        nodes = [call.given, *(s.returned for s in steps)]
        if any(node is None for node in nodes) or call.returned is None:
            return False
        consumers = [s.given for s in steps[1:]] + [call.returned]
        for i, start in enumerate(consumers):
            # between step i's output and what step i+1 (or the module) takes: only step i
            if not _only_through(start, nodes[i + 1], set(map(id, nodes[: i + 1]))):
                return False
        return True


def _only_through(start: object, gate: object, forbidden: set[int]) -> bool:
    """Whether every path back from `start` to the forbidden nodes passes `gate`, and `start`
    depends on `gate` at all."""
    if start is None:
        return False
    seen, todo, reached_gate = set(), [start], False
    while todo:
        node = todo.pop()
        if node is gate:
            reached_gate = True
            continue
        if id(node) in forbidden:
            return False
        if id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(fn for fn, _ in node.next_functions if fn is not None)
    return reached_gate


def _is_map(info) -> bool:
    """A map with more than one position (a 1x1 map is a pooled vector)."""
    return info is not None and len(info.shape) == 3 and info.shape[1] * info.shape[2] > 1


def _pick(path: list[str], trace: _Trace, layers: dict) -> list[str]:
    """One layer per run of the path (see the module docstring)."""
    runs: list[list[str]] = []
    for name in path:
        if not runs or _mixes(trace.calls[name].module):
            runs.append([name])
        else:
            runs[-1].append(name)
    picked = []
    for run in runs:
        choice = run[0] if _is_map(layers.get(run[0])) else None
        grid = layers[choice].shape[1:] if choice else None
        bare = not trace.steps(run[0])  # a lone conv: its norm is what the network passes on
        for name in run[1:]:
            info = layers.get(name)
            if not _is_map(info) or (grid and info.shape[1:] != grid):
                if info is not None and choice is not None:
                    break  # pooling: the run's map ends here
                continue
            grid = info.shape[1:]
            module = trace.calls[name].module
            if choice is None or _is_activation(module) or (bare and isinstance(module, _NORMS)):
                choice = name
        if choice is not None:
            picked.append(choice)
    return picked


def default_layers(model) -> list[str]:
    """The names of the main-path layers of a LoadedModel, in execution order."""
    if not model.hookable:
        return []
    trace = _Trace(model)
    layers = {layer.name: layer for layer in model.layers}
    path = [""]
    while True:
        picked = _pick(path, trace, layers)
        if len(picked) >= MIN_LAYERS:
            return picked
        refined = []
        for name in path:
            steps = trace.steps(name)
            plain = all(not trace.steps(step) for step in steps)
            chain = name == "" or trace.is_chain(name)  # the model's top level is its path
            opens = chain and steps and not (plain and len(_pick(steps, trace, layers)) <= 1)
            refined += steps if opens else [name]
        if refined == path:
            return picked
        path = refined
