"""atlas on a real one-node SLURM that .ci/slurm.sh starts on this machine: worker jobs and the
progress line while they queue, faults under the scheduler (scancel, walltime), Ctrl-C, bad
input, and the nightly sbatch chain of docs/history.md. Also the GPU pinning of several workers
in one job, on real Dask worker processes."""

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
from test_execute import DASK, check_complete, environment, stored, wait_for

from atlas import models

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / ".ci" / "slurm.sh"
NIGHTLY = ROOT / "docs" / "examples" / "nightly.sbatch"
GATED = ["tinymodels:gated", "--layers", "conv2", "--channels", "0-3", "--classes", ""]
GATED += ["--steps", "4", "--size", "32", "--batch", "1"]  # 4 tasks that wait at the gate


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


def jobs(state: str = "pending,running,completing") -> dict[str, str]:
    """Job id -> name of the jobs SLURM lists in `state` (by default all that are not over)."""
    listed = slurm_command("squeue", "-h", "-t", state, "-o", "%i %j")
    return dict(line.split(" ", 1) for line in listed.splitlines() if line.strip())


@pytest.fixture(autouse=True)
def no_job_left_behind(request):
    """Every test ends with SLURM's queue empty: atlas cancelled its worker jobs."""
    yield
    if "slurm" not in request.fixturenames:
        return
    try:
        wait_for(lambda: not jobs(), 30, "the queue to empty")
    finally:
        subprocess.run(["scancel", "--user", str(os.getuid())], check=False, timeout=60)


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


@pytest.fixture
def gate(tmp_path):
    """The file that holds the gated model's steps (tinymodels.gated) while it exists."""
    path = tmp_path / "gate"
    path.touch()
    yield path
    path.unlink(missing_ok=True)


def cluster_toml(path: Path, **settings) -> Path:
    lines = ["[cluster]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def job_logs(out: Path) -> dict[str, str]:
    """Job id -> what the job wrote to its error log in OUT/slurm-logs."""
    return {p.stem.rsplit("-", 1)[1]: p.read_text() for p in (out / "slurm-logs").glob("*.err")}


@pytest.mark.slurm
def test_a_tiny_atlas_runs_on_a_worker_job_that_ends_with_it(slurm, tmp_path):
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


@pytest.mark.slurm
def test_plan_times_each_layer_shape_on_a_worker_job(slurm, tmp_path, monkeypatch):
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


@pytest.mark.slurm
def test_queued_jobs_are_reported_and_ctrl_c_cancels_every_job(slurm, tmp_path, gate):
    """Two jobs that each take every core of the node: one runs, the other waits in the
    queue, and the progress line says so; Ctrl-C then cancels both."""
    (cpus,) = slurm_command("sinfo", "-h", "-N", "-o", "%c").split()
    config = cluster_toml(tmp_path / "atlas.toml", jobs=2, cores=int(cpus), memory="2GB")
    out = tmp_path / "atlas"
    run = Atlas(tmp_path / "log", "run", *GATED, "--config", config, "--out", out,
                env={"ATLAS_TEST_GATE": str(gate)})  # fmt: skip
    try:
        queued = "1 of 2 worker jobs running, 1 pending in partition debug (Resources)"
        wait_for(lambda: run.says(queued), 120, "a job running and one queued")
        wait_for(lambda: Path(f"{gate}.held").exists(), 120, "a task on the worker")
        assert len(jobs("running")) == 1 and len(jobs("pending")) == 1
        run.process.send_signal(signal.SIGINT)
        output = run.wait(60)
    finally:
        run.kill()
    assert run.process.returncode == 130, output
    assert output.strip().splitlines()[-1] == "interrupted", output
    assert "Traceback" not in output
    wait_for(lambda: not jobs(), 15, "both jobs to be gone")
    assert stored(out) == [] and not list(out.rglob("*.tmp"))


def run_past_a_lost_job(tmp_path, gate, config: Path, lose) -> tuple[Atlas, Path, str]:
    """Starts a gated run, waits until its worker job holds a task, calls `lose(job)` and
    waits for the job that replaces it; then opens the gate. Returns the finished run, OUT
    and the id of the lost job."""
    out = tmp_path / "atlas"
    run = Atlas(tmp_path / "log", "run", *GATED, "--config", config, "--out", out,
                env={"ATLAS_TEST_GATE": str(gate)})  # fmt: skip
    try:
        wait_for(lambda: run.says("4 units to do"), 120, "the worker to join")
        wait_for(lambda: Path(f"{gate}.held").exists(), 60, "a task on the worker")
        (first,) = jobs("running")
        lose(first)
        wait_for(lambda: set(jobs("running")) - {first}, 150, "a job to replace the lost one")
        assert stored(out) == []  # every task was held: the lost job finished none
        gate.unlink()
        output = run.wait(300)
    finally:
        run.kill()
    assert run.process.returncode == 0, output
    assert "4 done, 0 failed, 0 already stored of 4 units" in output
    check_complete(out, 4)
    return run, out, first


@pytest.mark.slurm
def test_a_cancelled_worker_job_is_replaced_and_its_tasks_rerun(slurm, tmp_path, gate):
    config = cluster_toml(tmp_path / "atlas.toml", min_jobs=1, max_jobs=1, memory="2GB")
    _, out, first = run_past_a_lost_job(
        tmp_path, gate, config, lambda job: slurm_command("scancel", job)
    )
    logs = job_logs(out)
    assert len(logs) == 2 and f"JOB {first} ON" in logs[first]


@pytest.mark.slurm
def test_a_worker_job_past_its_walltime_is_replaced(slurm, tmp_path, gate):
    """SLURM ends a job a minute (and up to its 30 s check) after it started."""
    config = cluster_toml(tmp_path / "atlas.toml", walltime="1", memory="2GB")

    def time_out(job: str) -> None:
        wait_for(lambda: job not in jobs("running"), 150, "the job's time limit")

    _, out, first = run_past_a_lost_job(tmp_path, gate, config, time_out)
    assert "DUE TO TIME LIMIT" in job_logs(out)[first]


@pytest.mark.slurm
def test_bad_cluster_settings_are_one_line(slurm, tmp_path):
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
    assert not jobs()


@pytest.mark.slurm
def test_the_nightly_sbatch_script_runs_and_queues_the_next_night(slurm, tmp_path):
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

    try:  # the first night has loaded last.pt: the training job writes the next checkpoint
        wait_for(lambda: plan().get("checkpoint", {}).get("seq") == 1, 180, "the first night")
        (tmp_path / "next.pt").replace(tmp_path / "last.pt")

        def two_nights() -> bool:
            manifest = out / "manifest.json"
            found = json.loads(manifest.read_text()) if manifest.exists() else {}
            return [c["complete"] for c in found.get("checkpoints", [])] == [True, True]

        wait_for(two_nights, 240, "the second night's checkpoint")
    finally:
        subprocess.run(["scancel", "--name", "atlas-nightly"], check=False, timeout=60)
    shown = (ROOT / "docs" / "history.md").read_text()  # the script as the docs show it
    assert all(line in shown for line in NIGHTLY.read_text().splitlines() if line[:2] != "# ")
    nights = sorted(tmp_path.glob("slurm-*.out"))
    assert len(nights) >= 2
    assert "4 done, 0 failed" in nights[0].read_text()
    assert "Submitted batch job" in nights[0].read_text()  # it queued the next night first


def test_workers_of_a_several_gpu_job_take_one_gpu_each(tmp_path):
    """`--preload atlas.slurm` (a job with gpus = 2): `dask worker --nworkers 2` names its
    workers <job>-0 and <job>-1, and each keeps its own of the job's GPUs."""
    from distributed import Client

    scheduler_file = tmp_path / "scheduler.json"
    env = {**environment(), "CUDA_VISIBLE_DEVICES": "3,5"}
    started = [
        subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                          "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([DASK, "worker", "--scheduler-file", str(scheduler_file),
                          "--nworkers", "2", "--nthreads", "1", "--name", "job-7",
                          "--preload", "atlas.slurm", "--no-dashboard", "--host", "127.0.0.1"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    try:
        wait_for(scheduler_file.exists, 60, "the scheduler")
        with Client(scheduler_file=str(scheduler_file), timeout="20s") as client:
            client.wait_for_workers(2, timeout=120)
            names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
            visible = client.run(os.environ.get, "CUDA_VISIBLE_DEVICES")
    finally:
        for process in started:
            process.kill()
            process.wait()
    assert {names[address]: devices for address, devices in visible.items()} == {
        "job-7-0": "3",
        "job-7-1": "5",
    }
