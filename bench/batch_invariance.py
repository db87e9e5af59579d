"""How much a unit's picture depends on the batch it is made in: each unit optimized in one
batch with others, in that same batch again, and alone, with one seed and one set of weights.

    .venv/bin/python bench/batch_invariance.py [--model efficientnet_lite0] [--layer blocks.8]
        [--channels 4-7] [--classes 8,285] [--steps 32] [--size 64] [--threads N]

Every image has its own random stream (start image and transforms), so only the arithmetic of
a batch differs: convolutions over 4 images may sum in another order than over 1, and the
optimization carries the difference on. Reports, per unit, the pixel difference between its
batched and alone pictures, and the change score that `atlas compare` and the nightly history
would give the pair (atlas.change, both sides measured by the one model): it should stay near
0, as a unit that did not change. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from atlas import models
from atlas.activations import activation_grid, clean_activations
from atlas.change import change, cross
from atlas.config import parse_indices
from atlas.optim import channel, get, logit, visualize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layer", default="blocks.8")
    parser.add_argument("--channels", default="4-7")
    parser.add_argument("--classes", default="")
    parser.add_argument("--recipe", default="fourier")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = models.load(args.model)
    recipe = get(args.recipe, steps=args.steps, size=args.size)
    channels = parse_indices(args.channels, 10**6, "channel") if args.channels else []
    classes = parse_indices(args.classes, 10**6, "class") if args.classes else []
    targets = [channel(args.layer, c) for c in channels] + [logit(k) for k in classes]
    batched = visualize(model, targets, recipe, seed=args.seed)
    again = visualize(model, targets, recipe, seed=args.seed)
    alone = [visualize(model, [t], recipe, seed=args.seed)[0] for t in targets]

    together_images = [r.image for r in batched]
    alone_images = [r.image for r in alone]
    grey = np.full_like(together_images[0], 128)
    on_grey = activation_grid(model, targets, [grey])[0].tolist()
    own_batched = clean_activations(model, targets, together_images)
    own_alone = clean_activations(model, targets, alone_images)
    rows = []
    for i, target in enumerate(targets):
        difference = np.abs(batched[i].image.astype(int) - alone[i].image.astype(int))
        score = change(
            [
                cross(own_alone[i], own_batched[i], on_grey[i]),  # alone's picture, batched's own
                cross(own_batched[i], own_alone[i], on_grey[i]),
            ]
        )
        rows.append(
            {
                "unit": target.id,
                "same_batch_identical": bool((batched[i].image == again[i].image).all()),
                "mean_abs_diff": round(float(difference.mean()), 2),
                "max_abs_diff": int(difference.max()),
                "objective_step0": [batched[i].history[0], alone[i].history[0]],
                "start_identical": bool((batched[i].start == alone[i].start).all()),
                "change": None if math.isnan(score) else round(score, 4),
            }
        )
    print(
        f"{'unit':<16} {'same batch':>10} {'start':>6} {'mean|d|':>8} {'max|d|':>7} {'change':>7}"
    )
    for row in rows:
        print(
            f"{row['unit']:<16} {'identical' if row['same_batch_identical'] else 'DIFFERS':>10} "
            f"{'same' if row['start_identical'] else 'DIFF':>6} {row['mean_abs_diff']:>8.2f} "
            f"{row['max_abs_diff']:>7} {row['change'] if row['change'] is not None else '-':>7}"
        )
    changes = [r["change"] for r in rows if r["change"] is not None]
    summary = {
        "model": args.model,
        "recipe": recipe.name,
        "steps": args.steps,
        "size": args.size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "units": rows,
        "mean_abs_diff": round(float(np.mean([r["mean_abs_diff"] for r in rows])), 2),
        "max_change": max(changes) if changes else None,
        "mean_change": round(float(np.mean(changes)), 4) if changes else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
