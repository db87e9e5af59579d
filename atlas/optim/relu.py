"""Redirected ReLU gradients, so that units which never fire on the starting image still start.

A channel whose pre-activation is negative everywhere on a grey image sits behind a ReLU that
passes no gradient: its image never changes and stays grey (37 of the first 48 `head` channels
of EfficientNet-Lite0). Lucid's remedy, reimplemented here: when nothing at all gets through a
ReLU (or ReLU6) for an image, let through the gradient components that would move the clamped
inputs back towards the active range; as soon as anything gets through, the gradient is the
ordinary one. Decided per image, so no image's redirection depends on its batch. Only
the first steps need it (a unit that has started keeps going), so recipes limit it to those:
it costs a host sync per ReLU per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from atlas.layers import clamp_bounds


class RedirectedClamp(torch.autograd.Function):
    """y = x.clamp(low, high) forward; backward as described in the module docstring. Like
    torch's own ReLU it keeps only y (x is clamped exactly where y sits on a bound)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        y = x.clamp(low, None if math.isinf(high) else high)
        ctx.save_for_backward(y)
        ctx.bounds = low, high
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        low, high = ctx.bounds
        inside = (y > low) & (y < high)
        plain = grad * inside
        per_image = tuple(range(1, y.dim()))
        dead = ~(plain != 0).any(dim=per_image) if y.dim() > 1 else plain == 0
        if not dead.any():  # the usual case: one check, no redirection
            return plain, None, None
        # gradient descent moves x by -grad: a negative grad raises x, a positive one lowers it
        back_inside = inside | ((y <= low) & (grad < 0)) | ((y >= high) & (grad > 0))
        dead = dead.view(-1, *([1] * (y.dim() - 1)))
        return torch.where(dead, grad * back_inside, plain), None, None


class Switch:
    """Turns the redirection on and off between steps (it is only needed at the start)."""

    on = True


@contextmanager
def redirected_relus(module: nn.Module) -> Iterator[Switch]:
    """Inside the block, every ReLU and ReLU6 module of `module` redirects its gradient while
    the yielded switch is on; the modules are restored on every exit path. Functional relu
    calls inside a forward cannot be reached and keep the ordinary gradient."""
    switch, switched = Switch(), []

    def redirecting(submodule: nn.Module, clamp: tuple[float, float]):
        ordinary = submodule.forward
        return lambda x: RedirectedClamp.apply(x, *clamp) if switch.on else ordinary(x)

    for submodule in module.modules():
        clamp = clamp_bounds(submodule)
        if clamp is None or "forward" in vars(submodule):
            continue
        submodule.forward = redirecting(submodule, clamp)
        switched.append(submodule)
    try:
        yield switch
    finally:
        for submodule in switched:
            del submodule.forward
