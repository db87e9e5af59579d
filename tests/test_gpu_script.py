"""bench/gpu.sh, the prepared GPU check (issue 13), in its dry run: every step on the CPU with a
tiny configuration, so that the script a GPU machine runs once does not rot in between."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench/gpu.sh"
STEPS = 6
DRY_RUN_LIMIT_S = 300  # about 60 s on a quiet 2-core CPU; shared machines are slower


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "OUT": str(out), "GPU_PYTHON": sys.executable}
    env.pop("GPU_RESULTS", None)
    started = time.monotonic()
    done = subprocess.run(
        ["bash", SCRIPT, "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2 * DRY_RUN_LIMIT_S,
    )
    return done, out, time.monotonic() - started


def test_the_script_parses_and_refuses_unknown_arguments():
    assert subprocess.run(["bash", "-n", SCRIPT], cwd=ROOT).returncode == 0
    done = subprocess.run(["bash", SCRIPT, "--bogus"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown argument: --bogus" in done.stderr


def test_the_dry_run_runs_every_step_quickly(dry_run):
    done, _, seconds = dry_run
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-2000:]
    assert seconds < DRY_RUN_LIMIT_S
    for step in range(1, STEPS + 1):
        assert f"=== step {step}: " in done.stdout


def summary_rows(results: str) -> list[tuple[int, str]]:
    rows = re.findall(r"^\| (\d)\. [^|]+ \| ([^|]+) \| \d+ \| \d+ \|$", results, re.M)
    return [(int(step), status.strip()) for step, status in rows]


def test_the_results_list_every_step_with_a_status_and_its_commands(dry_run):
    _, out, _ = dry_run
    results = (out / "gpu-results.md").read_text()
    assert (out / "gpu-results-logs.txt").is_file()
    assert results.startswith("## GPU check (`bench/gpu.sh --dry-run`)")
    for field in ("- device: dry run on the CPU", "- date: ", "; commit: ", "interpreter: "):
        assert field in results
    rows = summary_rows(results)
    assert [step for step, _ in rows] == list(range(1, STEPS + 1))
    assert all(status for _, status in rows)
    for step in range(1, STEPS + 1):
        section = results.split(f"\n### {step}. ")[1].split("\n### ")[0]
        assert re.search(r"^- `.+` \(budget \d+ s\)$", section, re.M), section
    assert "1 skipped" in results  # the CUDA test, which needs a GPU
    assert "the loop called torch.autocast" in results  # the override reached the loop
    assert "| conv2 | 12x16x16 | 4 |" in results  # a batch size timed
    assert "46 units done, 0 failed, of 46" in results  # the whole tiny atlas
    assert "every worker got tasks" in results


def test_every_step_passes_in_the_dry_run(dry_run):
    done, out, _ = dry_run
    rows = summary_rows((out / "gpu-results.md").read_text())
    assert [status for _, status in rows] == ["ok"] * STEPS, rows
    assert done.returncode == 0
