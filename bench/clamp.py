"""Reading a layer before or after the ReLU6 that ends it (EfficientNet-Lite0's `head`).

    .venv/bin/python bench/clamp.py [--layer head] [--units 0-7] [--steps 128]

Renders the same channels twice with the default recipe: as atlas reads them (before the
clamp) and as they were read before that (after it, an ablation made by forgetting the clamp).
For each way it reports when the best image was reached and, on the stored images shown to the
model cleanly, the channel's mean before and after the clamp and the share of positions that
sit on the clamp's upper bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime

import torch
from speed import cores, git_commit

from atlas import activations, models
from atlas.config import parse_indices
from atlas.layers import clamp_bounds, resolve
from atlas.optim import channel, get, visualize


def read_after_the_clamp(model) -> None:
    """The ablation: every layer forgets its clamp, so objectives read the layer's output."""
    layers = [dataclasses.replace(layer, pre_activation=None) for layer in model.layers]
    model.__dict__["layers"] = layers  # replaces the cached discovery


def describe(model, layer: str, results, high: float) -> dict:
    """Best steps, and the clean activations of the stored images before/after the clamp."""
    fresh = models.load(model.spec)  # reads before the clamp, whatever `model` was made to do
    images = [r.image for r in results]
    objectives = [r.objective for r in results]
    maps = []

    def keep(first: int, acts: dict) -> None:
        for row, objective in enumerate(objectives[first : first + len(acts[layer])]):
            maps.append(acts[layer][row, objective.main_target.index].float())

    activations.for_each_batch(fresh, objectives, images, 8, keep)
    before = torch.stack([m.mean() for m in maps])
    after = torch.stack([m.clamp(0, high).mean() for m in maps])
    saturated = torch.stack([(m >= high).float().mean() for m in maps])
    steps = [r.best_step for r in results]
    return {
        "best step": f"{min(steps)}-{max(steps)}",
        "mean before clamp": f"{before.mean():.2f}",
        "mean after clamp": f"{after.mean():.3f}",
        "positions at the bound": f"{saturated.mean():.0%}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layer", default="head")
    parser.add_argument("--units", default="0-7")
    parser.add_argument("--steps", type=int, default=128)
    args = parser.parse_args()

    model = models.load(args.model)
    info = resolve(model, args.layer)
    if info.pre_activation is None:
        parser.error(f"{args.layer} does not end in a saturating clamp")
    high = clamp_bounds(model.module.get_submodule(info.pre_activation))[1]
    targets = [channel(args.layer, i) for i in parse_indices(args.units, info.channels, "unit")]
    recipe = get("fourier", steps=args.steps)
    rows = {"before the clamp (atlas)": visualize(model, targets, recipe)}
    ablation = models.load(args.model)
    read_after_the_clamp(ablation)
    rows["after the clamp"] = visualize(ablation, targets, recipe)

    print(
        f"{datetime.date.today()}, commit {git_commit()}, {cores()} CPU cores, "
        f"{args.model} {args.layer}:{args.units}, {args.steps} steps, clamp at {high:g}"
    )
    table = {name: describe(model, args.layer, results, high) for name, results in rows.items()}
    header = ["read", *next(iter(table.values()))]
    print("\n| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for name, row in table.items():
        print("| " + " | ".join([name, *row.values()]) + " |")


if __name__ == "__main__":
    main()
