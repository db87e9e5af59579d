"""A faster copy of a frozen model for the optimization loop, computing the same function.

The model is frozen and in eval mode, so each BatchNorm after a convolution is an affine map
that can be folded into the convolution's weights, and the zero padding that TF-style "same"
convolutions apply in a separate op can move into the convolution when it is symmetric. On a
2-core CPU this made a Lite0 step 1.5x faster (bench/speed.py). Folding changes what a folded
convolution's own output means, so convolutions whose output is hooked are left alone; the
BatchNorm becomes an Identity whose output is what it was. Two layouts of BatchNorm are folded:
torch's own, and timm's BatchNormAct2d, whose dropout and activation (its children `drop` and
`act`) stay in place under their names; any other subclass stays unfolded. Every copy is
checked against the original on a random input, on the layers the optimization reads, before
it is used; a copy that cannot be made or differs is dropped and the model runs unfolded:
folding never fails a unit.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from atlas.errors import describe
from atlas.layers import capture, deepest, module_device, run_forward
from atlas.record import LOGITS

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # largest difference allowed, relative to the layer's largest magnitude


NORM_ACT_CHILDREN = ["drop", "act"]  # timm's BatchNormAct2d: batch_norm, then drop, then act


def foldable(norm: nn.Module) -> bool:
    """A BatchNorm2d whose layout is known: torch's own forward and no children, or timm's
    BatchNormAct2d (torch's batch norm, then its children `drop` and `act`)."""
    if not isinstance(norm, nn.BatchNorm2d) or not norm.track_running_stats:
        return False
    children = [name for name, _ in norm.named_children()]
    own = type(norm).forward is nn.BatchNorm2d.forward
    return (own and not children) or (not own and children == NORM_ACT_CHILDREN)


class FoldedNorm(nn.Module):
    """What is left of a BatchNormAct2d once its norm is folded: its drop and act, by name."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.drop, self.act = norm.drop, norm.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def conv_bn_pairs(module: nn.Module, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) names where the BatchNorm's input is exactly the output of the
    convolution, each called once per forward pass (measured by a dry pass on `sample`)."""
    names = {mod: name for name, mod in module.named_modules()}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors keep their ids unique
    calls: dict[str, int] = {}
    pairs = []

    def after_conv(mod, _inputs, output):
        calls[names[mod]] = calls.get(names[mod], 0) + 1
        outputs[id(output)] = (names[mod], output)

    def before_bn(mod, inputs):
        calls[names[mod]] = calls.get(names[mod], 0) + 1
        source = outputs.get(id(inputs[0]))
        if source is not None and source[1] is inputs[0]:
            pairs.append((source[0], names[mod]))

    handles = []
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(after_conv))
        elif foldable(mod):
            handles.append(mod.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            module(sample)
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, bn) for conv, bn in pairs if calls[conv] == calls[bn] == 1]


def _plain_padding(conv: nn.Conv2d) -> nn.Conv2d:
    """A TF-"same" convolution (a Conv2d with a `static_padding` ZeroPad2d child) as a plain
    Conv2d padding by itself, when the padding is symmetric; otherwise `conv` unchanged."""
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, nn.ZeroPad2d | nn.Identity):
        return conv
    left, right, top, bottom = getattr(pad, "padding", (0, 0, 0, 0))
    if (left, top) != (right, bottom) or conv.padding_mode != "zeros":
        return conv
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        padding=(top, left),
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    ).eval()
    plain.weight, plain.bias = conv.weight, conv.bias
    return plain


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name), child, new)


def fold_batchnorm(module: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Folds, in place, each BatchNorm of `pairs` into its convolution."""
    for conv_name, bn_name in pairs:
        conv = _plain_padding(module.get_submodule(conv_name))
        norm = module.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, norm)
        fused.weight.requires_grad_(False)
        fused.bias.requires_grad_(False)
        _replace(module, conv_name, fused)
        _replace(module, bn_name, FoldedNorm(norm) if len(norm._modules) else nn.Identity())


def _outputs(model, module: nn.Module, sample: torch.Tensor, names: list[str]) -> dict:
    """The layers `names` (`logits` among them: the output) of `module` on `sample`, the pass
    stopped after the deepest of them."""
    hooked = [name for name in names if name != LOGITS]
    with torch.no_grad(), capture(model, hooked, deepest(model, names), module) as acts:
        output = run_forward(module, sample)
        if output is not None and LOGITS in names:
            acts[LOGITS] = output
        return dict(acts)


def agree(model, candidate: nn.Module, sample: torch.Tensor, names: list[str]) -> bool:
    """Whether `candidate` gives the same layers `names` as `model` on `sample`."""
    expected = _outputs(model, model.module, sample, names)
    found = _outputs(model, candidate, sample, names)
    for name, tensor in expected.items():
        scale = tensor.abs().max().clamp_min(1e-6)
        if (found[name] - tensor).abs().max() > TOLERANCE * scale:
            return False
    return True


_copies: WeakKeyDictionary[nn.Module, dict] = WeakKeyDictionary()


def _inside(name: str, convs: Collection[str]) -> bool:
    return any(name == conv or name.startswith(conv + ".") for conv in convs)


def _sample(model) -> torch.Tensor:
    """Two fixed random images, normalized, on the model's device: the input of the checks."""
    device = module_device(model.module)
    images = torch.rand(
        2, model.input_channels, *model.input_size, generator=torch.Generator().manual_seed(0)
    )
    return model.normalize.to(device)(images.to(device))


def running_module(model, hooked: Collection[str], with_logits: bool = True) -> nn.Module:
    """What the optimization loop runs for these hooked layers (and the logits, when
    `with_logits`): a copy of `model.module` with its BatchNorms folded, except into hooked
    convolutions (or ones holding a hooked layer). The module itself when there is nothing to
    fold, or when the copy cannot be made or does not compute the same hooked layers and
    logits (a convolution's output also read elsewhere, for example). Only the latest copy is
    kept, with the layers it was checked on; with block outputs hooked (no convolution left
    unfolded) that is one copy per process."""
    module = model.module
    if not model.hookable:
        return module
    cache = _copies.setdefault(module, {})
    try:
        if "pairs" not in cache:  # once per model: a dry pass only when there is a BatchNorm
            has_batchnorm = any(foldable(m) for m in module.modules())
            cache["pairs"] = conv_bn_pairs(module, _sample(model)) if has_batchnorm else []
        pairs = [(c, bn) for c, bn in cache["pairs"] if not any(_inside(h, [c]) for h in hooked)]
        if not pairs:
            return module
        key = frozenset(pairs)
        if cache.get("key") != key:
            candidate = copy.deepcopy(module)
            fold_batchnorm(candidate, pairs)
            cache.update(key=key, copy=candidate, agrees=set(), differs=set())
        checked = list(dict.fromkeys([*hooked, *([LOGITS] if with_logits else [])]))
        unchecked = [name for name in checked if name not in cache["agrees"] | cache["differs"]]
        if unchecked:
            same = agree(model, cache["copy"], _sample(model), unchecked)
            cache["agrees" if same else "differs"].update(unchecked)
            if not same:
                changed = ", ".join(unchecked)
                log.warning(
                    "%s: folding BatchNorm changed its outputs (%s); runs unfolded",
                    model.spec,
                    changed,
                )
        return module if cache["differs"] & set(checked) else cache["copy"]
    except Exception as error:  # a layout folding does not know: run the model as it is
        log.warning("%s: BatchNorm not folded (%s); runs unfolded", model.spec, describe(error))
        cache.clear()
        cache["pairs"] = []
        return module
