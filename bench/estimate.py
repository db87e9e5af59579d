"""How good `atlas plan`'s estimate is: plan a small atlas (its calibration: a few timed steps
per layer shape on a worker), run it, and compare per layer the estimated seconds per unit
with the seconds the run's units took (their records' share of their task's time), and the
estimated total with the units' total (issue 25).

    .venv/bin/python bench/estimate.py [--steps 128] [--channels 0-7] [ATLAS RUN OPTIONS...]

Without options it is Lite0's three demo layers, 8 channels each and 4 classes, 128 steps, in
a temporary OUT; other options go to both `atlas plan` and `atlas run` as they are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

DEFAULT = ["efficientnet_lite0", "--layers", "blocks.3", "--layers", "blocks.8", "--layers",
           "blocks.13", "--classes", "hen,pelican,espresso,castle"]  # fmt: skip


def atlas(*args: str) -> tuple[str, float]:
    """`atlas ARGS` in a process of its own: its stdout and its wall time."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "atlas", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"atlas {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="128")
    parser.add_argument("--channels", default="0-7")
    args, extra = parser.parse_known_args()
    options = [*(extra or DEFAULT), "--steps", args.steps, "--channels", args.channels]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        planned, plan_seconds = atlas("plan", *options, "--out", str(out), "--json")
        plan = json.loads(planned)
        ran, run_seconds = atlas("run", *options, "--out", str(out))
        seconds = defaultdict(list)
        for path in out.glob("units/*/*.json"):
            record = json.loads(path.read_text())
            if record["status"] == "done":
                seconds[record["layer"]].append(record["seconds"])
    print(f"atlas plan {' '.join(options)}: {plan_seconds:.1f} s, on {plan['device']}")
    print(f"atlas run: {ran.strip().splitlines()[0]} ({run_seconds:.1f} s with its start)")
    print(f"{'layer':<12} {'units':>5} {'estimated s/unit':>17} {'measured':>9} {'error':>7}")
    total_estimated = total_measured = 0.0
    for row in plan["layers"]:
        taken = seconds[row["layer"]]
        measured = sum(taken) / len(taken)
        estimated = row["seconds_per_unit"]
        total_estimated += estimated * len(taken)
        total_measured += sum(taken)
        print(f"{row['layer']:<12} {len(taken):>5} {estimated:>17.3f} {measured:>9.3f} "
              f"{estimated / measured - 1:>+7.0%}")  # fmt: skip
    error = total_estimated / total_measured - 1
    print(f"all units: estimated {total_estimated:.1f} s, measured {total_measured:.1f} s, "
          f"error {error:+.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
