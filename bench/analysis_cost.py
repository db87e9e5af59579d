"""What a unit's analyses cost next to its optimization: circuits, class effects and maps
(atlas.analysis) and the trust patterns (atlas.trust), per unit, against 512 steps.

    .venv/bin/python bench/analysis_cost.py [--model efficientnet_lite0] [--layer blocks.8]
        [--inputs blocks.3] [--batch 4] [--steps 16] [--exemplars 6] [--device cpu]

The optimization is timed over `--steps` steps of one task (the median step, after the first)
and scaled to 512 steps; the analyses are timed on the same task's images, as a worker runs
them. With exemplars, the trust pass forwards each unit's picture and its exemplars once (the
64 random images are shared by every unit of an atlas and left out), and the evidence task
measures inputs and classes again on the picture and its exemplars (random images stand in
for them: the cost is the same). Prints one JSON line and a sentence.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np
import torch

from atlas import models
from atlas.activations import model_inputs
from atlas.analysis import analyse, class_effects, input_weights
from atlas.layers import capture, deepest, run_forward
from atlas.optim import channel, get, visualize
from atlas.optim.device import describe_device, resolve_device

FULL_STEPS = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layer", default="blocks.8")
    parser.add_argument("--inputs", default="blocks.3")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--exemplars", type=int, default=6)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = models.load(args.model)
    model.module.to(device)
    targets = [channel(args.layer, i) for i in range(args.batch)]
    stamps: list[float] = []
    results = visualize(
        model,
        targets,
        get("fourier", steps=args.steps),
        device=device,
        on_step=lambda *_: stamps.append(time.perf_counter()),
    )
    step = statistics.median(b - a for a, b in itertools.pairwise(stamps))
    images, starts = [r.image for r in results], [r.start for r in results]
    started = time.perf_counter()
    analyse(model, targets, images, starts, 1, args.inputs)
    analysis = time.perf_counter() - started
    rng = np.random.default_rng(0)
    shown = images + [
        (rng.random((224, 224, 3)) * 255).astype(np.uint8)
        for _ in range(args.batch * args.exemplars)
    ]
    layers = [args.inputs]
    started = time.perf_counter()
    with torch.no_grad(), capture(model, layers, deepest(model, layers)):
        run_forward(model.module, model_inputs(model, shown, device))
    patterns = time.perf_counter() - started
    started = time.perf_counter()  # evidence: one unit's inputs and classes on 1 + K images
    evidence = shown[:1] + shown[args.batch : args.batch + args.exemplars]
    input_weights(model, targets[:1] * len(evidence), evidence, args.inputs)
    class_effects(model, targets[:1] * len(evidence), evidence)
    evidence_seconds = time.perf_counter() - started
    optimization = step * FULL_STEPS
    per_unit = {
        "optimization_512_steps": optimization / args.batch,
        "analysis": analysis / args.batch,
        "trust_patterns": patterns / args.batch,
        "evidence": evidence_seconds,
    }
    extra = per_unit["analysis"] + per_unit["trust_patterns"] + per_unit["evidence"]
    share = extra / per_unit["optimization_512_steps"]
    row = {
        "model": args.model,
        "layer": args.layer,
        "inputs": args.inputs,
        "batch": args.batch,
        "device": describe_device(device),
        "seconds_per_step": round(step, 4),
        "per_unit_seconds": {k: round(v, 3) for k, v in per_unit.items()},
        "share_of_512_steps": round(share, 4),
    }
    print(json.dumps(row))
    print(
        f"analyses {per_unit['analysis']:.2f} s + trust {per_unit['trust_patterns']:.2f} s + "
        f"exemplar evidence {per_unit['evidence']:.2f} s per unit against "
        f"{per_unit['optimization_512_steps']:.1f} s of 512 steps: {share:.1%}"
    )


if __name__ == "__main__":
    main()
