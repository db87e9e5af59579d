"""atlas on a real one-node SLURM that .ci/slurm.sh starts on this machine: worker jobs and the
progress line while they queue, `atlas plan` timing on a worker job, faults under the
scheduler (scancel, walltime), Ctrl-C, bad input, and the nightly sbatch chain of
docs/history.md. SLURM ends a job at its walltime a minute (and up to its 30 s check) after it
started, so the run that meets it starts with the module and waits at its gate meanwhile."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from clihelpers import assert_bad_input, invoke
from test_execute import check_complete, environment, stored, wait_for

from atlas import models

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / ".ci" / "slurm.sh"
NIGHTLY = ROOT / "docs" / "examples" / "nightly.sbatch"
GATED = ["tinymodels:gated", "--layers", "conv2", "--channels", "0-3", "--classes", ""]
GATED += ["--steps", "4", "--size", "32", "--batch", "1"]  # 4 tasks that wait at the gate
TIMED_OUT = "atlas-timed-out"  # the worker jobs of the run that meets its walltime


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM for this module: started by .ci/slurm.sh (which installs it with apt
    when missing), its SLURM_CONF in this process's environment and so in atlas's and its
    jobs'; stopped afterwards. Where it cannot start the tests skip, except in CI."""
    folder = Path(tempfile.mkdtemp(prefix="atlas-slurm-"))
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=600
    )
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        reason = (started.stderr.strip().splitlines() or ["no reason given"])[-1]
        message = f"no one-node SLURM on this machine: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(folder / "slurm.conf"))
            yield folder
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], timeout=120, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def slurm_command(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout


def jobs(state: str = "pending,running,completing", name: str | None = None) -> dict[str, str]:
    """Job id -> name of the jobs SLURM lists in `state` (by default all that are not over),
    only those named `name` when given."""
    listed = slurm_command("squeue", "-h", "-t", state, "-o", "%i %j")
    found = dict(line.split(" ", 1) for line in listed.splitlines() if line.strip())
    return {job: named for job, named in found.items() if name in (None, named)}


def ours() -> list[str]:
    """The jobs not of the run that meets its walltime (it outlives the tests before it)."""
    return sorted(job for job, name in jobs().items() if name != TIMED_OUT)


class Atlas:
    """`atlas ...` in a process whose output goes to a file, read while it runs."""

    def __init__(self, log: Path, *args, env: dict | None = None):
        self.log = log
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "atlas", *map(str, args)],
                env={**environment(), **(env or {})},
                stdout=handle,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def says(self, text: str) -> bool:
        if self.process.poll() is not None and text not in self.output():
            raise AssertionError(f"atlas ended ({self.process.returncode}):\n{self.output()}")
        return text in self.output()

    def wait(self, timeout: float = 300) -> str:
        self.process.wait(timeout=timeout)
        return self.output()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def cluster_toml(path: Path, **settings) -> Path:
    lines = ["[cluster]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def gated_run(folder: Path, gate: Path, **cluster) -> tuple[Atlas, Path]:
    """A run of 4 tasks held at `gate` (tinymodels.gated), on worker jobs of `cluster`."""
    out, config = folder / "atlas", cluster_toml(folder / "atlas.toml", memory="2GB", **cluster)
    run = Atlas(folder / "log", "run", *GATED, "--config", config, "--out", out,
                env={"ATLAS_TEST_GATE": str(gate)})  # fmt: skip
    return run, out


def job_logs(out: Path) -> dict[str, str]:
    """Job id -> what the job wrote to its error log in OUT/slurm-logs."""
    return {p.stem.rsplit("-", 1)[1]: p.read_text() for p in (out / "slurm-logs").glob("*.err")}


@pytest.fixture(scope="module", autouse=True)
def timed_out(slurm, tmp_path_factory):
    """The run whose one worker job meets its walltime of a minute: started first, its tasks
    held at its gate until the last test opens it (after that job's end and its successor's
    start), so that the minute passes while the other tests run."""
    folder = tmp_path_factory.mktemp("timed-out")
    gate = folder / "gate"
    gate.touch()
    run, out = gated_run(folder, gate, walltime="1", name=TIMED_OUT)
    yield run, out, gate
    gate.unlink(missing_ok=True)
    run.kill()
    subprocess.run(["scancel", "--name", TIMED_OUT], check=False, timeout=60)


@pytest.fixture(autouse=True)
def no_job_left_behind(slurm):
    """Every test ends with its jobs gone from SLURM's queue: atlas cancelled them."""
    yield
    try:
        wait_for(lambda: not ours(), 30, "the queue to empty")
    finally:
        if left := ours():
            subprocess.run(["scancel", *left], check=False, timeout=60)


@pytest.fixture
def gate(tmp_path):
    """The file that holds the gated model's steps while it exists."""
    path = tmp_path / "gate"
    path.touch()
    yield path
    path.unlink(missing_ok=True)


def test_a_tiny_atlas_runs_on_a_worker_job_that_ends_with_it(tmp_path):
    out = tmp_path / "atlas"
    run = Atlas(tmp_path / "log", "run", "tinymodels:tiny", "--layers", "conv1",
                "--channels", "0-3", "--classes", "0-1", "--steps", "2", "--size", "32",
                "--cluster", "slurm", "--out", out)  # fmt: skip
    output = run.wait()
    assert run.process.returncode == 0, output
    assert "1 of 1 worker jobs running" in output
    assert "6 done, 0 failed, 0 already stored of 6 units" in output
    check_complete(out, 6)
    ((job, log),) = job_logs(out).items()  # one worker job, its log in OUT
    assert f"JOB {job} ON" in log and "CANCELLED" in log  # ended by atlas, not by a limit


def test_plan_times_each_layer_shape_on_a_worker_job(tmp_path, monkeypatch):
    """conv1, conv2 and the logits: three shapes, each timed on the worker job (which finds
    the model's module on the PYTHONPATH of atlas's process)."""
    monkeypatch.setenv("PYTHONPATH", environment()["PYTHONPATH"])
    found = invoke("plan", "tinymodels:tiny", "--layers", "conv1", "--layers", "conv2",
                   "--channels", "0-3", "--classes", "0-1", "--steps", "8", "--size", "32",
                   "--cluster", "slurm", "--out", tmp_path / "atlas", "--json")  # fmt: skip
    assert found.exit_code == 0, found.output
    assert "1 of 1 worker jobs running" in found.stderr
    assert "3/3 layer shapes" in found.stderr
    summary = json.loads(found.stdout)
    assert summary["device"] == "cpu" and summary["calibration_failures"] == []
    assert [row["estimate_from"] for row in summary["layers"]] == ["calibration"] * 3
    assert all(row["seconds_per_unit"] > 0 for row in summary["layers"])
    assert not (tmp_path / "atlas" / "units").exists()  # planning stores nothing


def test_queued_jobs_are_reported_and_ctrl_c_cancels_every_job(tmp_path, gate):
    """Two jobs that each take every idle core of the node: one runs, the other waits in
    the queue, and the progress line says so; Ctrl-C then cancels both."""
    (cpus,) = slurm_command("sinfo", "-h", "-N", "-o", "%C").split()  # allocated/idle/...
    run, out = gated_run(tmp_path, gate, jobs=2, cores=int(cpus.split("/")[1]))
    try:
        queued = "1 of 2 worker jobs running, 1 pending in partition debug (Resources)"
        wait_for(lambda: run.says(queued), 120, "a job running and one queued")
        wait_for(lambda: Path(f"{gate}.held").exists(), 120, "a task on the worker")
        assert list(jobs("running", "atlas-worker")) and list(jobs("pending", "atlas-worker"))
        run.process.send_signal(signal.SIGINT)
        output = run.wait(60)
    finally:
        run.kill()
    assert run.process.returncode == 130, output
    assert output.strip().splitlines()[-1] == "interrupted", output
    assert "Traceback" not in output
    wait_for(lambda: not ours(), 15, "both jobs to be gone")
    assert stored(out) == [] and not list(out.rglob("*.tmp"))


def finish(run: Atlas, out: Path, gate: Path) -> None:
    """Opens the gate of a run whose held tasks no job has finished, and checks that the
    run completes with every unit done and whole."""
    try:
        assert stored(out) == []  # every task was held: no job finished one
        gate.unlink()
        output = run.wait(300)
    finally:
        run.kill()
    assert run.process.returncode == 0, output
    assert "4 done, 0 failed, 0 already stored of 4 units" in output
    check_complete(out, 4)


def test_a_cancelled_worker_job_is_replaced_and_its_tasks_rerun(tmp_path, gate):
    """Adaptive between 1 and 1 job: the job is cancelled mid-task, a new one is submitted,
    and the cancelled job's tasks are computed there."""
    name = "atlas-cancelled"
    run, out = gated_run(tmp_path, gate, min_jobs=1, max_jobs=1, name=name)
    try:
        wait_for(lambda: run.says("4 units to do"), 120, "the worker to join")
        wait_for(lambda: Path(f"{gate}.held").exists(), 60, "a task on the worker")
        (first,) = jobs("running", name)
        slurm_command("scancel", first)
        wait_for(lambda: set(jobs("running", name)) - {first}, 60, "a job in its place")
    except BaseException:
        run.kill()
        raise
    finish(run, out, gate)
    logs = job_logs(out)
    assert len(logs) == 2 and f"JOB {first} ON" in logs[first] and "CANCELLED" in logs[first]


def test_bad_cluster_settings_are_one_line(tmp_path):
    base = ["run", "tinymodels:tiny", "--layers", "conv1", "--out", tmp_path / "atlas"]
    config = cluster_toml(tmp_path / "a.toml", partition="gpus")
    assert_bad_input(invoke(*base, "--config", config), "no partition 'gpus'", "debug")
    config = cluster_toml(tmp_path / "b.toml", memory="900TB")
    found = invoke(*base, "--config", config)
    assert_bad_input(found, "sbatch refuses the worker job", "node configuration")
    config = cluster_toml(tmp_path / "c.toml", python="/nowhere/python")
    found = invoke(*base, "--config", config)  # submitted: the jobs' line comes first
    assert found.exit_code == 2 and "Traceback" not in found.output
    last = found.stderr.splitlines()[-1]
    assert last.startswith("error: the worker jobs ended before a worker joined: ")
    assert "/nowhere/python: No such file or directory" in last and "slurm-logs" in last


def test_the_nightly_sbatch_script_runs_and_queues_the_next_night(tmp_path):
    """docs/examples/nightly.sbatch, with the next night 5 seconds away: two nights, a new
    checkpoint in each (the training job, here the test, replaced the weights in between)."""
    module = models.load("tinymodels:tiny").module
    state = {k: v.clone() for k, v in module.state_dict().items()}
    torch.save(state, tmp_path / "last.pt")
    state["conv2.weight"][3].neg_()
    torch.save(state, tmp_path / "next.pt")
    out = tmp_path / "nightly"  # not atlas/: tests put the working folder on PYTHONPATH
    (tmp_path / "atlas.toml").write_text(
        'model = "tinymodels:tiny"\nweights = "last.pt"\nlayers = ["conv2"]\nchannels = "0-3"\n'
        f'classes = ""\nout = "{out}"\nscheduler = "inline"\n[recipe]\nsteps = 2\nsize = 32\n'
    )
    env = {**environment(), "NEXT_RUN": "5 seconds"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    subprocess.run(["sbatch", "--begin=now+2", str(NIGHTLY)], cwd=tmp_path, env=env,
                   check=True, capture_output=True, timeout=60)  # fmt: skip

    def plan() -> dict:
        try:
            return json.loads((out / "plan.json").read_text())
        except (OSError, ValueError):
            return {}

    def two_nights() -> bool:
        manifest = out / "manifest.json"
        found = json.loads(manifest.read_text()) if manifest.exists() else {}
        return [c["complete"] for c in found.get("checkpoints", [])] == [True, True]

    try:  # the first night has loaded last.pt: the training job writes the next checkpoint
        wait_for(lambda: plan().get("checkpoint", {}).get("seq") == 1, 180, "the first night")
        (tmp_path / "next.pt").replace(tmp_path / "last.pt")
        wait_for(two_nights, 240, "the second night's checkpoint")
    finally:
        subprocess.run(["scancel", "--name", "atlas-nightly"], check=False, timeout=60)
    shown = (ROOT / "docs" / "history.md").read_text()  # the script as the docs show it
    assert all(line in shown for line in NIGHTLY.read_text().splitlines() if line[:2] != "# ")
    nights = sorted(tmp_path.glob("slurm-*.out"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(nights) >= 2
    first = nights[0].read_text()
    assert first.startswith("Submitted batch job") and "4 done, 0 failed" in first


def test_a_worker_job_past_its_walltime_is_replaced(timed_out):
    """The run started with the module: its job meets its walltime with a task held, a job
    takes its place, and the run completes there."""
    run, out, gate = timed_out

    def timed_out_jobs() -> set[str]:
        return {job for job, log in job_logs(out).items() if "DUE TO TIME LIMIT" in log}

    try:
        wait_for(timed_out_jobs, 150, "the job's time limit")
        wait_for(lambda: set(jobs("running", TIMED_OUT)) - timed_out_jobs(), 60, "a new job")
    except BaseException:
        run.kill()
        raise
    finish(run, out, gate)
