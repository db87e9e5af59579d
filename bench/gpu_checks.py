"""The Python steps of bench/gpu.sh (issue 13): each prints a Markdown section for the results.

    python bench/gpu_checks.py parity   [--model M] [--targets T,T] [--steps 64] [--device cuda]
    python bench/gpu_checks.py batches  [--model M] [--layers L,L] [--batches 8,32,128,512]
    python bench/gpu_checks.py cluster  [--model M] [--layer L] [--channels 0-63] [--expect 2]
    python bench/gpu_checks.py summary  --plan PLAN.json --out DIR --wall S [--rc N]
    python bench/gpu_checks.py junit    REPORT.xml [...]

- parity: the same units visualized on CUDA with bf16 autocast (the engine's default there)
  and with autocast forced off (fp32; `torch.autocast` is wrapped inside this process only,
  atlas has no flag for it), and as a reference in fp32 on the CPU. Per unit: the objective
  each run reached, the clean fp32 activation of each image, and pixel differences.
- batches: one task per layer at increasing batch sizes: peak CUDA memory
  (torch.cuda.max_memory_allocated), time per unit-step, the largest batch that fits a memory
  budget (from a straight-line fit of peak memory on batch size) and atlas.plan.default_batch.
- cluster: atlas's own local cluster (atlas.execute.executor, as `atlas run` starts it) runs real
  tasks (atlas.optimize.optimize_task); each reports the worker's CUDA_VISIBLE_DEVICES,
  process and GPU, so the check can say whether every pinned worker got tasks on a GPU of its
  own.
- summary: an `atlas run` that may have been stopped at its time cap, against `atlas plan --json`.
- junit: pass/fail/skip counts of pytest's --junitxml reports.

Every step stops early (with what it has) after --seconds, and prints as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

GIB = 2**30


def say(line: str = "") -> None:
    print(line, flush=True)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_visualize(model, targets, recipe, device, on_step=None):
    from atlas.optim import visualize

    sync(device)
    started = time.perf_counter()
    results = visualize(model, targets, recipe, seed=0, device=device, on_step=on_step)
    sync(device)
    return results, time.perf_counter() - started


# --- parity: bf16 autocast against fp32 -------------------------------------------------------


@contextmanager
def watched_autocast(force_off: bool):
    """Wraps torch.autocast for the block: records the `enabled` each call asked for and, with
    `force_off`, turns it off. atlas.optim.loop calls `torch.autocast(...)` at run time, so
    the wrapper is what it gets; an empty record means the loop no longer goes through it."""
    import torch

    original = torch.autocast
    asked: list[bool] = []

    def autocast(device_type, *args, **kwargs):
        asked.append(bool(kwargs.get("enabled", True)))
        if force_off:
            kwargs["enabled"] = False
        return original(device_type, *args, **kwargs)

    torch.autocast = autocast
    try:
        yield asked
    finally:
        torch.autocast = original


def parity(args) -> int:
    import numpy as np
    import torch

    from atlas import models
    from atlas.activations import clean_activations
    from atlas.optim import get
    from atlas.targets import parse_target

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as atlas.optimize.optimize_task sets it on workers
    model = models.load(args.model)
    targets = [parse_target(text.strip(), model) for text in args.targets.split(",")]
    recipe = get("fourier", steps=args.steps)
    started = time.monotonic()
    runs: dict[str, dict] = {}

    def run(name: str, on: torch.device, force_off: bool) -> None:
        with watched_autocast(force_off) as asked:
            timed_visualize(model, targets[:2], recipe.replace(steps=2), on)  # warm-up
            results, seconds = timed_visualize(model, targets, recipe, on)
        if not asked:
            raise SystemExit("the loop no longer calls torch.autocast: the override is void")
        model.module.to("cpu")  # the clean activations: fp32 on the CPU, the original module
        model.normalize.to("cpu")
        images = [r.image for r in results]
        runs[name] = {
            "objective": [r.objective_best for r in results],
            "clean": clean_activations(model, targets, images),
            "images": images,
            "seconds": seconds,
            "note": f"{name}: {seconds:.2f} s for the batch; the loop called torch.autocast "
            f"{len(asked)} times, asking enabled={Counter(asked)[True]} times"
            + (" (forced off here)" if force_off else ""),
        }

    def pixels(a: str, b: str, i: int) -> float:
        diff = runs[a]["images"][i].astype(np.int16) - runs[b]["images"][i].astype(np.int16)
        return float(np.abs(diff).mean())

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    def table(a: str, b: str) -> None:
        columns = [
            "unit",
            f"objective {a}",
            f"objective {b}",
            "ratio",
            f"clean {a}",
            f"clean {b}",
            "ratio",
            "\\|px\\| difference",
        ]
        say("| " + " | ".join(columns) + " |")
        say("| --- " * len(columns) + "|")
        objectives, cleans, diffs = [], [], []
        for i, target in enumerate(targets):
            oa, ob = runs[a]["objective"][i], runs[b]["objective"][i]
            ca, cb = runs[a]["clean"][i], runs[b]["clean"][i]
            objectives.append(ratio(oa, ob))
            cleans.append(ratio(ca, cb))
            diffs.append(pixels(a, b, i))
            say(
                f"| {target.id} | {oa:.3f} | {ob:.3f} | {objectives[-1]:.3f} | {ca:.3f} "
                f"| {cb:.3f} | {cleans[-1]:.3f} | {diffs[-1]:.1f} |"
            )
        say()
        say(
            f"{a} over {b}: objective ratio mean {statistics.mean(objectives):.3f} (range "
            f"{min(objectives):.3f}-{max(objectives):.3f}), clean activation ratio mean "
            f"{statistics.mean(cleans):.3f} (range {min(cleans):.3f}-{max(cleans):.3f}); "
            f"mean |px| difference {statistics.mean(diffs):.1f} of 255."
        )
        say()

    base = "bf16 autocast" if device.type == "cuda" else f"{device.type}, autocast off"
    ref = "fp32 (autocast forced off)"
    run(base, device, force_off=False)
    run(ref, device, force_off=True)
    say(
        f"{args.model}, {len(targets)} units, recipe fourier at {args.steps} steps, seed 0, on "
        f"{describe(device)}; cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} (the fp32 run's "
        f"convolutions), matmul precision {torch.get_float32_matmul_precision()}. Objective: the "
        "best value each run reached, in its own precision; clean: the activation of the stored "
        "uint8 image in fp32 on the CPU, without transforms; |px|: mean absolute difference "
        "of the two images in 0-255 levels."
    )
    say()
    table(base, ref)
    cpu = "fp32 on the CPU"
    if device.type == "cuda" and not args.no_cpu:
        if time.monotonic() - started < args.seconds / 2:
            run(cpu, torch.device("cpu"), force_off=True)
            say("Against the CPU (how far two fp32 runs drift apart, for scale):")
            say()
            table(ref, cpu)
            table(base, cpu)
        else:
            say(f"{cpu}: not run (over half of the {args.seconds:.0f} s budget spent).")
    for run_facts in runs.values():
        say(f"- {run_facts['note']}")
    if base in runs and ref in runs:
        say(f"- {ref} over {base}: {runs[ref]['seconds'] / runs[base]['seconds']:.2f}x the time")
    return 0


def describe(device) -> str:
    from atlas.optim.device import describe_device

    return describe_device(device)


# --- batches: peak memory and speed per batch size ---------------------------------------------


def batches(args) -> int:
    import torch

    from atlas import models
    from atlas.layers import resolve
    from atlas.optim import channel, get, logit
    from atlas.plan import default_batch
    from atlas.record import LOGITS

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = models.load(args.model)
    recipe = get("fourier", steps=args.steps, diversity=0.0)
    sizes = [int(b) for b in args.batches.split(",") if b]
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    budgets = [float(b) * GIB for b in args.budgets.split(",") if b]
    if cuda:
        budgets.append(0.8 * total)
    started = time.monotonic()
    say(
        f"{args.model}, recipe fourier, {args.steps} steps per batch (median of the last "
        f"{args.steps - 1} step times), on {describe(device)}"
        + (f" ({total / GIB:.0f} GiB)" if cuda else "")
        + ". Peak: torch.cuda.max_memory_allocated during the task (the model included)."
    )
    say()
    say("| layer | shape | batch | peak GiB | ms/step | ms/unit-step |")
    say("| --- | --- | --- | --- | --- | --- |")
    fits = []
    for name in [x.strip() for x in args.layers.split(",") if x.strip()]:
        layer = resolve(model, name)
        shape = "x".join(map(str, layer.shape))
        points: list[tuple[int, float]] = []
        failed_at = None
        for size in sizes:
            if time.monotonic() - started > args.seconds:
                say(f"| {name} | {shape} | {size} | (time budget spent) | | |")
                break
            count = layer.channels
            targets = [
                logit(i % count) if name == LOGITS else channel(name, i % count)
                for i in range(size)
            ]
            stamps: list[float] = []
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)

            def stamp(*_, stamps=stamps) -> None:
                sync(device)
                stamps.append(time.perf_counter())

            try:
                timed_visualize(model, targets, recipe, device, on_step=stamp)
            except torch.OutOfMemoryError:
                failed_at = size
                say(f"| {name} | {shape} | {size} | out of memory | | |")
                break
            per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
            peak = torch.cuda.max_memory_allocated(device) if cuda else None
            if peak is not None:
                points.append((size, peak))
            say(
                f"| {name} | {shape} | {size} | {'-' if peak is None else f'{peak / GIB:.2f}'} "
                f"| {per_step * 1000:.1f} | {per_step * 1000 / size:.2f} |"
            )
        fits.append((name, layer, points, failed_at))
    say()
    if not cuda:
        say("No CUDA device: memory not measured, so no batch sizes from memory.")
        return 0
    heads = " | ".join(f"largest batch in {b / GIB:.0f} GiB" for b in budgets)
    say(f"| layer | default_batch (cuda) | GiB per unit | {heads} |")
    say("| --- " * (3 + len(budgets)) + "|")
    for name, layer, points, failed_at in fits:
        cells = []
        slope = None
        if len(points) >= 2:
            (b0, m0), (b1, m1) = points[0], points[-1]
            slope = (m1 - m0) / (b1 - b0)
        for budget in budgets:
            if slope is None or slope <= 0:
                cells.append("-")
                continue
            b0, m0 = points[0]
            largest = int(b0 + (budget - m0) / slope)
            if failed_at is not None:
                largest = min(largest, failed_at - 1)
            measured = max((b for b, m in points if m <= budget), default=0)
            beyond = "" if largest <= points[-1][0] else " (extrapolated)"
            cells.append(f"{max(largest, measured)}{beyond}")
        per_unit = "-" if slope is None else f"{slope / GIB:.3f}"
        say(f"| {name} | {default_batch(layer, 'cuda')} | {per_unit} | {' | '.join(cells)} |")
    return 0


# --- cluster: pinned workers each get tasks ----------------------------------------------------


def traced_task(model, task) -> dict:
    """Runs on a worker: the real task, then where it ran. Defined in __main__, so Dask sends it
    by value and workers need not import this file."""
    import os

    import torch

    from atlas.optimize import optimize_task

    result = optimize_task(model, task)
    cuda = torch.cuda.is_available()
    return {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
        "gpus": torch.cuda.device_count() if cuda else 0,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "units": len(task.units),
        "done": sum(1 for u in result["units"] if u["record"].status == "done"),
        "seconds": result["seconds"],
    }


def cluster(args) -> int:
    from atlas import models
    from atlas.config import AtlasConfig
    from atlas.execute import executor, visible_gpus
    from atlas.optim import get
    from atlas.plan import make_plan, make_tasks

    model = models.load(args.model)
    with tempfile.TemporaryDirectory() as out:
        config = AtlasConfig(
            model=args.model,
            out=out,
            layers=(args.layer,),
            channels=args.channels,
            classes="",
            recipe=get("fourier", steps=args.steps),
            batch=args.batch,
        )
        plan = make_plan(config, model)
        started = time.monotonic()
        workers: dict[tuple, Counter] = {}
        errors = []
        with executor(config, model) as pool:
            tasks = make_tasks(plan, list(plan.units), pool.device)
            say(
                f"atlas.execute.executor('local'): {pool.workers} worker(s) on {pool.device} "
                f"(visible_gpus() = {visible_gpus()}), {len(tasks)} tasks of {args.batch} "
                f"{args.layer} units, {args.steps} steps"
            )
            for outcome in pool.map(traced_task, tasks):
                if outcome.error:
                    errors.append(outcome.error)
                    continue
                r = outcome.result
                key = (r["visible"], r["pid"], r["gpus"], r["device"])
                workers.setdefault(key, Counter()).update(
                    tasks=1, units=r["units"], done=r["done"], seconds=r["seconds"]
                )
        wall = time.monotonic() - started
    say()
    say("| worker CUDA_VISIBLE_DEVICES | pid | GPUs seen | device | tasks | units done | busy s |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for (visible, pid, gpus, device), count in sorted(workers.items(), key=str):
        say(
            f"| {visible} | {pid} | {gpus} | {device} | {count['tasks']} | {count['done']} "
            f"| {count['seconds']:.1f} |"
        )
    say()
    problems = [f"{len(errors)} task(s) failed: {errors[0]}"] if errors else []
    if len(workers) != args.expect:
        problems.append(f"{len(workers)} worker(s) ran tasks, {args.expect} expected")
    pinned = [key for key in workers if key[3] != "cpu"]
    if pinned and any(key[2] != 1 for key in pinned):
        problems.append("a GPU worker sees more than one GPU: not pinned")
    if len({key[0] for key in pinned}) != len(pinned):
        problems.append("two workers share one CUDA_VISIBLE_DEVICES")
    verdict = "; ".join(problems) if problems else "every worker got tasks"
    say(f"{len(tasks)} tasks in {wall:.1f} s (cluster start and model loads included): {verdict}.")
    return 1 if problems else 0


# --- summary: a capped atlas run against the plan's estimate -----------------------------------


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def summary(args) -> int:
    from atlas.store import Store

    try:
        plan = json.loads(Path(args.plan).read_text())
    except (OSError, ValueError):
        plan = None
    store = Store(args.out, warn=lambda message: None)
    records = store.records(verify=False) if store.units_dir.is_dir() else []
    stamps = sorted(p.stat().st_mtime for p in store.units_dir.glob("*/*.json"))
    done = Counter(r.layer for r in records if r.status == "done")
    failed = Counter(r.layer for r in records if r.status != "done")
    seconds: dict[str, list[float]] = {}
    for r in records:
        if r.status == "done" and r.seconds:
            seconds.setdefault(r.layer, []).append(r.seconds)
    units = plan["units"] if plan else None
    estimate = plan.get("estimated_seconds") if plan else None
    total_done = sum(done.values())
    finished = args.rc == 0 and units is not None and total_done >= units
    capped = args.rc in (124, 137)
    say(
        f"`atlas run` {'finished' if finished else 'stopped at its cap' if capped else 'ended'}"
        f" (exit {args.rc}) after {fmt(args.wall)} (cap {fmt(args.cap)}): {total_done} units "
        f"done, {sum(failed.values())} failed, of {units if units is not None else '?'}."
    )
    if plan:
        sources = sorted({row["estimate_from"] for row in plan["layers"] if row["todo"]})
        say(
            f"`atlas plan`: {plan['units']} units in {plan['tasks']} tasks on one "
            f"{plan['device']} worker, estimated {fmt(estimate)} (from {', '.join(sources)})."
        )
    projected = None
    if total_done:
        projected = args.wall if finished else args.wall * (units or total_done) / total_done
        rate = total_done / args.wall
        say(
            f"Throughput over the whole run: {rate:.2f} units/s"
            + ("" if finished else f"; at that rate the whole atlas takes {fmt(projected)}")
            + "."
        )
    if len(stamps) >= 2 and stamps[-1] > stamps[0]:
        first = stamps[0] - args.started
        steady = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        say(
            f"First unit stored {first:.0f} s after the start (cluster, model load, first task); "
            f"from then on {steady:.2f} units/s"
            + ("" if finished or not units else f", which projects {fmt(first + units / steady)}")
            + "."
        )
    if projected and estimate:
        say(f"Measured (or projected) over the plan's estimate: {projected / estimate:.2f}x.")
    if projected and plan and plan["model"] == "efficientnet_lite0":
        target = "met" if projected <= 300 else "not met"
        say(f"Issue 5's target, the full Lite0 atlas within 5 minutes on one GPU: {target}.")
    if plan:
        say()
        say("| layer | units | done | plan s/unit | measured s/unit (median of records) | ratio |")
        say("| --- | --- | --- | --- | --- | --- |")
        for row in plan["layers"]:
            layer, planned = row["layer"], row["seconds_per_unit"]
            measured = statistics.median(seconds[layer]) if layer in seconds else None
            ratio = f"{measured / planned:.3f}" if measured and planned else "-"
            say(
                f"| {layer} | {row['units']} | {done[layer]} | "
                f"{'-' if planned is None else f'{planned:.3f}'} | "
                f"{'-' if measured is None else f'{measured:.3f}'} | {ratio} |"
            )
    return 0


# --- junit: pytest counts ---------------------------------------------------------------------


def junit(args) -> int:
    counts: Counter = Counter()
    failing, skipped = [], []
    for report in args.reports:
        try:
            root = ET.parse(report).getroot()
        except (OSError, ET.ParseError) as error:
            say(f"- {report}: no report ({error})")
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = {child.tag for child in case}
            if "failure" in kinds:
                counts["failed"] += 1
                failing.append(name)
            elif "error" in kinds:
                counts["errors"] += 1
                failing.append(name)
            elif "skipped" in kinds:
                counts["skipped"] += 1
                message = next(c for c in case if c.tag == "skipped").get("message", "")
                skipped.append(f"{name} ({message})")
            else:
                counts["passed"] += 1
    say(", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped")))
    for name in failing[:20]:
        say(f"- failed: `{name}`")
    for name in skipped[: args.show_skipped]:
        say(f"- skipped: `{name}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("parity", help="bf16 autocast against fp32")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument(
        "--targets",
        default="blocks.3:0,blocks.3:1,blocks.8:0,blocks.8:1,blocks.13:0,blocks.13:1,"
        "logits:hen,logits:espresso",
    )
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-cpu", action="store_true", help="no fp32 reference on the CPU")
    p.add_argument("--seconds", type=float, default=60)
    p.set_defaults(run=parity)

    p = commands.add_parser("batches", help="peak memory and speed per batch size")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--layers", default="stem,blocks.3,blocks.8,blocks.15,head,logits")
    p.add_argument("--batches", default="8,32,128,512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--budgets", default="16", help="GiB, besides 80%% of the GPU's memory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, default=60)
    p.set_defaults(run=batches)

    p = commands.add_parser("cluster", help="every pinned local worker gets tasks")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--layer", default="blocks.8")
    p.add_argument("--channels", default="0-63")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--expect", type=int, default=2, help="workers that should get tasks")
    p.set_defaults(run=cluster)

    p = commands.add_parser("summary", help="a capped atlas run against its plan")
    p.add_argument("--plan", required=True, help="`atlas plan --json` output")
    p.add_argument("--out", required=True, help="the run's output folder")
    p.add_argument("--wall", type=float, required=True, help="seconds the run took")
    p.add_argument("--started", type=float, default=0.0, help="its start, Unix time")
    p.add_argument("--cap", type=float, default=None, help="its time cap in seconds")
    p.add_argument("--rc", type=int, default=0, help="its exit status (124: capped)")
    p.set_defaults(run=summary)

    p = commands.add_parser("junit", help="counts of pytest --junitxml reports")
    p.add_argument("reports", nargs="+")
    p.add_argument("--show-skipped", type=int, default=0)
    p.set_defaults(run=junit)

    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
