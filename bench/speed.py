"""Feature-visualization throughput: atlas against Lucent and a naive loop (issue 5).

    .venv/bin/python bench/speed.py [--steps 64] [--layer blocks.8] [--units 0-7]
        [--batches 1,4,8] [--rounds 2] [--project-steps 8] [--no-projection] [--no-variants]

Needs the `bench` extra (`pip install -e ".[bench]"`: torch-lucent, kornia 0.4.1). All three run
side by side in this one process, with torch using every core, on the same EfficientNet-Lite0
module, the same units, the same number of steps and the same image size (the default recipe's
canvas, 192 px, optimized and shown to the model at 224 px):

- atlas: `visualize(model, targets, get("fourier", steps=N), seed=0)`, all units in one batch,
  and also in batches of each size of --batches;
- Lucent: `render_vis` one unit at a time with its standard transforms, Fourier parameterization
  and decorrelated colour; Lite0's normalization is appended to the transforms (preprocess=False)
  and Lucent upsamples to 224 px itself;
- naive: a plain Adam loop on the pixels of one 224 px image per unit, a forward hook on the
  layer, the full forward pass, no transforms, no batching.

Then, as an ablation, atlas at batch 1 and in one batch with its BatchNorm folding switched off
(atlas.optim.fold; the engine before it), and in one batch on the 128 px canvas of every default
before this one (what the larger canvas costs).

The methods run in --rounds interleaved rounds, each run warmed up with two steps before it is
timed; the table gives the fastest round's wall time, the median step time and, per round, the
share of the time some task waited for a CPU (other load on a shared machine). The result column
is the units' mean activation for the images each method returns (atlas: the best seen; the
others: the last), shown at 224 px without transforms: a check that every method optimizes;
image quality itself is issue 6.

Last, a projection for a full atlas of the model at the default recipe (512 steps): seconds per
unit per layer, timed with a short run at batch 8 (the first step not timed), times the layer's
channel count.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from atlas import models
from atlas.config import parse_indices
from atlas.layers import LOGITS, capture, resolve
from atlas.optim import channel, get, logit, loop, visualize
from atlas.plan import default_batch

FULL_STEPS = 512  # the default recipe's steps, for the projection
CANVAS = get("fourier").size  # px: every method optimizes an image this size
PROJECT_BATCH = 8  # units per timed batch on a CPU; on CUDA atlas.plan.default_batch decides
DEVICE = torch.device("cpu")  # --device; Lucent picks CUDA by itself whenever it is available


def sync() -> None:
    """Wait for the GPU, so that a timestamp means the work before it is done."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"this CPU ({cores()} threads)"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_stall() -> float | None:
    """Seconds that some task on this machine has waited for a CPU since boot (Linux pressure
    stall information), or None where the kernel does not say. Over a measurement, the share of
    its wall time stalled tells how much other load there was."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            return float(pressure.readline().rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def stall_share(stall_before: float | None, started: float) -> float:
    stall_after, elapsed = cpu_stall(), time.perf_counter() - started
    if stall_before is None or stall_after is None or elapsed <= 0:
        return float("nan")
    return (stall_after - stall_before) / elapsed


def target_for(layer: str, index: int):
    return logit(index) if layer == LOGITS else channel(layer, index)


def unit_activation(model, layer: str, index: int, image: torch.Tensor) -> float:
    """The unit's mean activation for one image [3, H, W] in [0, 1], shown at the model's input
    size with no transforms, read as atlas reads it (before a ReLU6 that ends the layer)."""
    view = F.interpolate(image[None].float().to(DEVICE), size=model.input_size, mode="bilinear")
    hooked = [] if layer == LOGITS else [layer]
    with torch.no_grad(), capture(model, hooked) as acts:
        logits = model.module(model.normalize(view.clamp(0, 1)))
    return float((logits if layer == LOGITS else acts[layer])[0, index].mean())


class StepClock:
    """Step durations: `start()` before each independent optimization (a unit, a batch), `tick`
    after each of its steps. Intervals run from tick to tick, so the first step of each
    optimization (set-up, first call) is not among them, nor is anything between two of them."""

    def __init__(self) -> None:
        self.runs: list[list[float]] = []

    def start(self) -> None:
        self.runs.append([])

    def tick(self, *_) -> None:
        sync()
        self.runs[-1].append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for run in self.runs for a, b in zip(run, run[1:], strict=False)]


# --- the three methods: each returns the final images [3, H, W] in [0, 1], one per unit --------


def run_atlas(model, layer, units, steps, clock, batch, size=CANVAS):
    recipe = get("fourier", steps=steps, size=size)
    images = []
    for first in range(0, len(units), batch):
        chunk = [target_for(layer, i) for i in units[first : first + batch]]
        clock.start()
        for result in visualize(model, chunk, recipe, seed=0, device=DEVICE, on_step=clock.tick):
            images.append(torch.from_numpy(result.image).permute(2, 0, 1).float() / 255)
    return images


def lucent_layer_name(layer: str) -> str:
    """Lucent names modules by their path joined with underscores; the output is the last one."""
    return "fc" if layer == LOGITS else layer.replace(".", "_")


def run_lucent(model, layer, units, steps, clock, size=128):
    return lucent_images(model, layer, units, (steps,), clock, size)[steps]


def lucent_images(model, layer, units, thresholds, clock, size=128) -> dict:
    """Lucent's `render_vis` with its defaults, one unit at a time: {step: [image, ...]} at
    each of `thresholds` (one run gives them all: its learning rate is constant)."""
    from lucent.optvis import param, render, transform

    # preprocess=False: the model's own normalization goes last, before Lucent's upsampling to
    # the model's input size (Lucent's own choice is 224 px whatever the model)
    transforms = list(transform.standard_transforms) + [lambda x: (x * 255 - 127) / 128]

    def adam(params):  # render_vis's default optimizer, with a clock on its steps
        optimizer = torch.optim.Adam(params, lr=5e-2)
        optimizer.register_step_post_hook(clock.tick)
        return optimizer

    images = {step: [] for step in thresholds}
    for index in units:
        clock.start()
        finals = render.render_vis(
            model.module,
            f"{lucent_layer_name(layer)}:{index}",
            param_f=lambda: param.image(size, fft=True, decorrelate=True),
            optimizer=adam,
            transforms=transforms,
            preprocess=False,
            fixed_image_size=model.input_size,
            show_image=False,
            progress=False,
            thresholds=tuple(thresholds),
        )
        # render_vis hooks every module and never removes its hooks: without this, each call
        # would add 188 more hooks to the shared model, slowing Lucent and everything after it.
        for module in model.module.modules():
            module._forward_hooks.clear()
        for step, final in zip(thresholds, finals, strict=True):
            images[step].append(torch.from_numpy(final[0]).permute(2, 0, 1))
    return images


def run_naive(model, layer, units, steps, clock, lr=0.05):
    module = model.module if layer == LOGITS else dict(model.module.named_modules())[layer]
    captured = {}
    handle = module.register_forward_hook(lambda _m, _i, out: captured.update(out=out))
    images = []
    try:
        for index in units:
            noise = torch.randn(1, 3, *model.input_size, device=DEVICE)
            image = (0.5 + 0.01 * noise).requires_grad_(True)
            optimizer = torch.optim.Adam([image], lr=lr)
            clock.start()
            for _ in range(steps):
                model.module(model.normalize(image))
                loss = -captured["out"][0, index].mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                clock.tick()
            images.append(image.detach()[0].clamp(0, 1).cpu())
    finally:
        handle.remove()
    return images


# --- ablation: what atlas's BatchNorm folding (atlas.optim.fold) buys ---------------------------


def unfolded(run):
    """`run` with atlas's BatchNorm folding switched off: the engine as it was before it."""

    def without_folding(*args):
        saved = loop.running_module
        loop.running_module = lambda model, hooked: model.module
        try:
            return run(*args)
        finally:
            loop.running_module = saved

    return without_folding


# --- measuring -----------------------------------------------------------------------------


def measure(methods, model, layer, units, steps, rounds):
    """Every method `rounds` times, interleaved (the order reversed every other round), each
    run warmed up with two steps first. A row per method: wall seconds per round, step times."""
    rows = {
        name: {"name": name, "seconds": [], "stalls": [], "steps": [], "acts": []}
        for name, *_ in methods
    }
    for number in range(rounds):
        order = methods if number % 2 == 0 else methods[::-1]
        for name, run, warm, per_step in order:
            torch.manual_seed(0)
            np.random.seed(0)
            run(units[:warm], 2, StepClock())
            clock = StepClock()
            stall, started = cpu_stall(), time.perf_counter()
            images = run(units, steps, clock)
            row = rows[name]
            row["seconds"].append(time.perf_counter() - started)
            row["stalls"].append(stall_share(stall, started))
            row["steps"] += [interval / per_step for interval in clock.intervals()]
            row["acts"] += [
                unit_activation(model, layer, u, im) for u, im in zip(units, images, strict=True)
            ]
            print(
                f"  round {number + 1}: {name}: {row['seconds'][-1]:.1f} s, "
                f"CPU stall {row['stalls'][-1]:.0%}",
                flush=True,
            )
    for row in rows.values():
        row["best"] = min(row["seconds"])
        row["median_step"] = statistics.median(row["steps"])  # seconds per unit-step
    return [rows[name] for name, *_ in methods]


def print_table(rows, units, steps):
    print(
        f"\n{'method':50} {'best s':>6} {'units/s':>7} {'unit-steps/s':>12} "
        f"{'ms/unit-step':>12} {'result':>6}  every round: s (CPU stall)"
    )
    for row in rows:
        per_s = units / row["best"]
        rounds = " ".join(
            f"{s:.1f} ({stall:.0%})" for s, stall in zip(row["seconds"], row["stalls"], strict=True)
        )
        print(
            f"{row['name']:50} {row['best']:6.1f} {per_s:7.3f} {per_s * steps:12.2f} "
            f"{row['median_step'] * 1000:12.1f} {np.mean(row['acts']):6.2f}  {rounds}"
        )
    print(
        "best s: the fastest round's wall time for all units; units/s and unit-steps/s from it.\n"
        "ms/unit-step: the median step time over the images per step (robust to other load).\n"
        "result: the units' mean activation for the returned images, at 224 px, no transforms.\n"
        "CPU stall: the share of the time some task on this machine waited for a CPU (Linux PSI);\n"
        "high when other work shares the cores."
    )


def projection(model, steps: int) -> None:
    """Seconds per unit per layer at FULL_STEPS, from the median of `steps` - 1 timed steps
    (the first is a warm-up) at atlas's batch for the device, times the layer's channel count."""
    recipe = get("fourier", steps=steps)
    wanted = ["stem", *[f"blocks.{i}" for i in range(16)], "head", LOGITS]
    batch = "8" if DEVICE.type == "cpu" else "atlas's default per layer"
    print(
        f"\nProjection: the full {model.spec} atlas, recipe fourier at {FULL_STEPS} steps, "
        f"batch {batch}, one process on {device_name()}; median of {steps - 1} timed steps "
        "per layer"
    )
    print(f"{'layer':10} {'units':>6} {'s/step':>7} {'s/unit':>7} {'hours':>7} {'CPU stall':>9}")
    total_units, total_hours = 0, 0.0
    for name in wanted:
        layer = resolve(model, name)
        size = PROJECT_BATCH if DEVICE.type == "cpu" else default_batch(layer, "cuda")
        count = min(size, layer.channels)
        stamps: list[float] = []
        stall, started = cpu_stall(), time.perf_counter()
        visualize(
            model,
            [target_for(name, i) for i in range(count)],
            recipe,
            seed=0,
            device=DEVICE,
            on_step=lambda *_, stamps=stamps: sync() or stamps.append(time.perf_counter()),
        )
        per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        per_unit = per_step * FULL_STEPS / count
        hours = per_unit * layer.channels / 3600
        total_units += layer.channels
        total_hours += hours
        print(
            f"{name:10} {layer.channels:6d} {per_step:7.3f} {per_unit:7.1f} {hours:7.2f} "
            f"{stall_share(stall, started):9.0%}"
        )
    print(f"{'total':10} {total_units:6d} {'':7} {'':7} {total_hours:7.2f}")
    minutes = total_hours * 60
    target = "met" if minutes <= 5 else "not met"
    if DEVICE.type == "cpu":
        target = "not measurable on a CPU"
    print(
        f"The full atlas on {device_name()}: {total_hours:.2f} h ({minutes:.1f} min) in one "
        f"process. GPU target (<= 5 minutes on one H100): {target}."
    )


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--layer", default="blocks.8")
    parser.add_argument("--units", default="0-7", help="channels (or classes): 0-7, 3,5,9, all")
    parser.add_argument("--batches", default="1,4,8", help="atlas batch sizes besides all units")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--project-steps", type=int, default=8)
    parser.add_argument("--no-projection", action="store_true")
    parser.add_argument("--no-variants", action="store_true", help="skip the ablation")
    parser.add_argument("--skip", default="", help="baselines to leave out: lucent,naive")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (Lucent follows CUDA)")
    args = parser.parse_args()

    global DEVICE
    DEVICE = torch.device(args.device)

    threads = cores()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script in kornia
    model = models.load("efficientnet_lite0")
    model.module.to(DEVICE)
    model.normalize.to(DEVICE)
    layer = resolve(model, args.layer)
    units = parse_indices(args.units, layer.channels, "unit", owner=layer.name)
    steps, skip = args.steps, set(filter(None, args.skip.split(",")))
    print(
        f"{datetime.date.today()}  commit {git_commit()}  torch {torch.__version__}  "
        f"{device_name()}  {model.spec}  {layer.name} units {args.units} ({len(units)})  "
        f"{steps} steps  {CANVAS} px optimized, 224 px shown  best of {args.rounds} rounds"
    )

    def atlas_method(batch, note=""):
        label = "all in one batch" if batch == len(units) else f"batch {batch}"
        run = lambda us, n, clock: run_atlas(model, layer.name, us, n, clock, batch)  # noqa: E731
        return (f"atlas ({label}{note})", run, min(batch, len(units)), min(batch, len(units)))

    batches = sorted({int(b) for b in args.batches.split(",") if b} - {len(units)})
    methods = [atlas_method(len(units)), *(atlas_method(b) for b in batches)]
    if "lucent" not in skip:
        lucent = lambda us, n, clock: run_lucent(model, layer.name, us, n, clock, CANVAS)  # noqa: E731
        methods.append(("Lucent render_vis (one unit a time)", lucent, 1, 1))
    if "naive" not in skip:
        naive = lambda us, n, clock: run_naive(model, layer.name, us, n, clock)  # noqa: E731
        methods.append(("naive Adam, 224 px pixels, one unit", naive, 1, 1))
    variants = []
    if not args.no_variants:
        for batch in (1, len(units)):
            name, run, warm, per_step = atlas_method(batch, note=", BatchNorm not folded")
            variants.append((name, unfolded(run), warm, per_step))
        small = lambda us, n, clock: run_atlas(model, layer.name, us, n, clock, len(us), 128)  # noqa: E731
        variants.append(("atlas (all in one batch, 128 px canvas)", small, len(units), len(units)))
    rows = measure(methods + variants, model, layer.name, units, steps, args.rounds)
    print_table(rows, len(units), steps)

    by_name = {row["name"]: row for row in rows}
    atlas_rows = [by_name[name] for name, *_ in methods if name.startswith("atlas")]
    one_batch = atlas_rows[0]
    best = min(atlas_rows, key=lambda row: row["best"])
    steady = min(atlas_rows, key=lambda row: row["median_step"])
    print(f"\nfastest atlas batch: {best['name']} (wall), {steady['name']} (median step)")
    for row in rows:
        if row["name"].startswith(("Lucent", "naive")):
            other = row["name"].split()[0]
            pairs = zip(row["seconds"], one_batch["seconds"], strict=True)
            print(
                f"atlas/{other} throughput, wall: {row['best'] / one_batch['best']:.2f}x all in "
                f"one batch, {row['best'] / best['best']:.2f}x best batch (per round, one "
                "batch: " + " ".join(f"{theirs / ours:.2f}x" for theirs, ours in pairs) + "); "
                f"median step: {row['median_step'] / one_batch['median_step']:.2f}x all in one "
                f"batch, {row['median_step'] / steady['median_step']:.2f}x best batch"
            )
    for name, *_ in variants:
        variant = by_name[name]
        print(
            f"atlas (best batch) over {name}: wall {variant['best'] / best['best']:.2f}x, "
            f"median step {variant['median_step'] / steady['median_step']:.2f}x"
        )
    if not args.no_projection:
        projection(model, args.project_steps)


if __name__ == "__main__":
    main()
