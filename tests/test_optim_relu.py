"""Redirected ReLU gradients: dead units start, live ones are untouched, modules restored."""

import pytest
import torch
from torch import nn

from atlas.optim import channel, get, logit, visualize
from atlas.optim.relu import RedirectedClamp, redirected_relus

QUICK = get("fourier", steps=12, size=32)


def gradients(x: torch.Tensor, grad: torch.Tensor, high: float = float("inf")):
    x = x.clone().requires_grad_(True)
    RedirectedClamp.apply(x, 0.0, high).backward(grad)
    return x.grad


def test_a_live_image_gets_the_ordinary_gradient():
    x = torch.tensor([[-1.0, 2.0, -3.0, 7.0]])
    grad = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
    assert gradients(x, grad).tolist() == [[0.0, -1.0, 0.0, 1.0]]  # as ReLU
    assert gradients(x, grad, high=6.0).tolist() == [[0.0, -1.0, 0.0, 0.0]]  # as ReLU6


def test_a_dead_image_gets_the_gradient_that_brings_it_back():
    x = torch.tensor([[-1.0, -2.0, -3.0], [1.0, -2.0, 8.0]])
    grad = torch.tensor([[-1.0, 1.0, -2.0], [0.0, -1.0, 1.0]])
    # image 0: nothing passes a plain ReLU; the components that raise x (grad < 0) go through.
    # image 1: alive (x = 1 passes, if with a zero gradient here, and 8 passes a ReLU)
    assert gradients(x, grad).tolist() == [[-1.0, 0.0, -2.0], [0.0, 0.0, 1.0]]
    # as ReLU6, image 1 is dead too (its only live input has grad 0): 8 > 6 may come down
    assert gradients(x, grad, high=6.0).tolist() == [[-1.0, 0.0, -2.0], [0.0, -1.0, 1.0]]


def test_a_dead_channel_starts_only_with_redirection(tiny):
    target = channel("relu2", 1)  # zero on the starting image of the tiny model
    (stuck,) = visualize(tiny, [target], QUICK.replace(redirect_relu=0))
    assert stuck.objective_best == stuck.objective_start == 0.0
    (started,) = visualize(tiny, [target], QUICK)
    assert started.objective_best > 0.0


def test_live_units_get_the_same_images_either_way(tiny):
    targets = [channel("relu2", 3), logit(3)]  # both respond from the first step
    ordinary = visualize(tiny, targets, QUICK.replace(redirect_relu=0), seed=2)
    redirected = visualize(tiny, targets, QUICK, seed=2)
    for a, b in zip(ordinary, redirected, strict=True):
        assert a.history == b.history and (a.image == b.image).all()


def test_modules_are_restored_after_an_error():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ReLU6())
    with pytest.raises(RuntimeError), redirected_relus(module) as switch:
        assert switch.on and "forward" in vars(module[1]) and "forward" in vars(module[2])
        raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in module)
