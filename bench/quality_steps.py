"""Image quality against steps (issue 13): Lite2's recognition of class images made with N
steps, atlas's default recipe against Lucent's, on drawn classes.

    .venv/bin/python bench/quality_steps.py [--sample 24 --block 0] [--steps 32,64,128,256,512]
        [--variant 'fourier key=value ...'] [--seed 0] [--only atlas|lucent]

atlas runs once per step count (its learning-rate schedule follows the total); Lucent runs once
to the largest count and its images are taken at every count on the way (its learning rate is
constant, so that is what a shorter run gives). Images are judged as stored (WebP), by
EfficientNet-Lite2, which never saw the optimization (the class logits are Lite0's). Needs the
`bench` extra, like bench/quality.py.
"""

from __future__ import annotations

import argparse
import datetime
import time
import warnings

import numpy as np
import torch
from quality import SIZE, as_stored, parse_variant, render_atlas, sampled_classes
from speed import StepClock, cores, git_commit, lucent_images

from atlas import models, quality
from atlas.layers import LOGITS
from atlas.optim import get, logit


def judged(judge, images, classes) -> tuple[float, float]:
    """(top-5 share, mean probability of the class) of uint8 images as stored."""
    scores = quality.transfer_scores(judge, as_stored(images), classes)
    return float(np.mean([s.top5 for s in scores])), float(np.mean([s.probability for s in scores]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=24)
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--steps", default="32,64,128,256,512")
    parser.add_argument("--variant", help="'PRESET key=value ...' instead of the default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("atlas", "lucent"), help="one of the two")
    args = parser.parse_args()

    torch.set_num_threads(cores())
    warnings.filterwarnings("ignore", category=FutureWarning)
    counts = sorted(int(n) for n in args.steps.split(","))
    lite0 = models.load("efficientnet_lite0")
    lite2 = models.load("efficientnet_lite2")
    classes = sampled_classes(args.sample, args.block)
    name, recipe = parse_variant(args.variant) if args.variant else ("fourier", get("fourier"))
    print(
        f"{datetime.date.today()}  commit {git_commit()}  torch {torch.__version__}  {cores()} "
        f"CPU threads  {len(classes)} classes (block {args.block} of --sample {args.sample})  "
        f"{SIZE} px  seed {args.seed}  judged as stored (WebP) by Lite2",
        flush=True,
    )
    groups = [(LOGITS, [logit(c) for c in classes])]
    rows = {}
    for steps in counts if args.only != "lucent" else ():
        started = time.perf_counter()
        images = render_atlas(lite0, groups, recipe.replace(steps=steps), args.seed)
        rows[(name, steps)] = (*judged(lite2, images, classes), time.perf_counter() - started)
        print(f"  atlas {name} {steps} steps: {rows[(name, steps)]}", flush=True)
    if args.only != "atlas":
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        started = time.perf_counter()
        found = lucent_images(lite0, LOGITS, classes, counts, StepClock(), size=SIZE)
        seconds = time.perf_counter() - started
        for steps, tensors in found.items():
            images = [
                (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy() for t in tensors
            ]
            rows[("Lucent", steps)] = (
                *judged(lite2, images, classes),
                seconds * steps / counts[-1],
            )
            print(f"  Lucent {steps} steps: {rows[('Lucent', steps)]}", flush=True)
    methods = list(dict.fromkeys(method for method, _ in rows))
    print("\n| steps | " + " | ".join(f"{m} top-5 | {m} p(class)" for m in methods) + " |")
    print("| --- |" + " --- | --- |" * len(methods))
    for steps in counts:
        cells = [f"{rows[(m, steps)][0]:.3f} | {rows[(m, steps)][1]:.3f}" for m in methods]
        print(f"| {steps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
