"""Atlas runs on real Dask processes on 127.0.0.1: a scheduler, two workers, kills."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from synthetic import make_image_folder

TESTS = Path(__file__).parent
DASK = str(Path(sys.executable).parent / "dask")
# conv1 (8) + conv2 (12) + 10 classes, one unit per task: 30 tasks
UNITS = 30
RUN_ARGS = ["--layers", "conv1", "--layers", "conv2", "--classes", "all", "--size", "32"]


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # two workers share two cores
    return env


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def running(process: subprocess.Popen) -> None:
    """Fail at once, with its output, when a process a test waits on has already ended."""
    if process.poll() is not None:
        output, _ = process.communicate()
        raise AssertionError(f"exited with {process.returncode} before it was due to:\n{output}")


STARTED: list[subprocess.Popen] = []


def start(*args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [*args], env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    STARTED.append(process)
    return process


@pytest.fixture(autouse=True)
def nothing_left_running():
    """A test that fails while waiting leaves no process behind (stopped ones included)."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def cluster(tmp_path):
    """`dask scheduler` and two nanny-less `dask worker` processes on 127.0.0.1."""
    scheduler_file = tmp_path / "scheduler.json"
    processes = [
        start(
            DASK,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        )
    ]
    wait_for(scheduler_file.exists, 30, "the scheduler file")
    workers = {}
    for name in ("w1", "w2"):
        workers[name] = start(
            DASK,
            "worker",
            "--scheduler-file",
            str(scheduler_file),
            "--nthreads",
            "1",
            "--no-nanny",
            "--no-dashboard",
            "--name",
            name,
            "--host",
            "127.0.0.1",
        )
        processes.append(workers[name])

    def joined() -> int:
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout="10s") as client:
            return len(client.scheduler_info()["workers"])

    wait_for(lambda: joined() == 2, 60, "two workers")
    yield {"file": scheduler_file, "workers": workers}
    for process in processes:
        process.kill()
        process.wait()


def atlas(*args: str) -> subprocess.Popen:
    return start(sys.executable, "-m", "atlas", *args)


def stored(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("units/*/*.json"))]


def check_complete(out: Path, count: int) -> None:
    records = stored(out)
    assert len(records) == count
    assert {r["status"] for r in records} == {"done"}
    for record in records:
        (image,) = record["images"]
        with Image.open(out / image) as picture:
            assert picture.size == (32, 32) and picture.format == "WEBP"
    assert not list(out.rglob("*.tmp")), "half-written files left behind"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["done"] == count and len(manifest["units"]) == count


def slow_run_args(cluster, out: Path) -> list[str]:
    """30 one-unit tasks of 150 steps: long enough to kill something mid-run."""
    return ["run", "tinymodels:tiny", *RUN_ARGS, "--steps", "150", "--batch", "1",
            "--scheduler-file", str(cluster["file"]), "--out", str(out)]  # fmt: skip


def test_a_worker_killed_mid_run_has_its_task_rerun_elsewhere(cluster, tmp_path):
    """w1 is killed while the scheduler has it processing atlas tasks; w2 finishes them."""
    from distributed import Client

    out = tmp_path / "atlas"
    with Client(scheduler_file=str(cluster["file"]), timeout="10s") as client:
        client.get_task_stream()  # from now the scheduler records which worker finished what
        address = {i["name"]: a for a, i in client.scheduler_info()["workers"].items()}
        held: list[str] = []
        run = atlas(*slow_run_args(cluster, out))

        def victim_holds_atlas_tasks() -> bool:
            running(run)
            keys = client.processing(workers=[address["w1"]]).get(address["w1"], [])
            held[:] = [str(key) for key in keys if str(key).startswith("atlas-")]
            return bool(held)

        wait_for(victim_holds_atlas_tasks, 300, "w1 to be processing an atlas task")
        victim = cluster["workers"]["w1"]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        output, _ = run.communicate(timeout=300)
        finished = [r for r in client.get_task_stream() if r["status"] == "OK"]
    assert run.returncode == 0, output
    assert f"{UNITS} done, 0 failed, 0 already stored" in output, output
    check_complete(out, UNITS)
    # Polled from the start, w1 is caught within a poll of getting its first task, long before
    # that task's 150 steps end: the kill takes it from w1, and w2 runs it again
    rerun = {r["key"] for r in finished if r["worker"] == address["w2"]} & set(held)
    assert rerun, f"no task of those w1 held ({held}) was finished by w2"


def test_a_killed_client_leaves_whole_units_and_the_rerun_does_only_the_rest(cluster, tmp_path):
    out = tmp_path / "atlas"
    args = slow_run_args(cluster, out)
    first = atlas(*args)
    wait_for(lambda: running(first) or len(stored(out)) >= 4, 300, "the first units")
    # Freeze the client (waitpid returns once all its threads are stopped), so that what is
    # counted is what the kill leaves: nothing is stored between the count and the kill
    first.send_signal(signal.SIGSTOP)
    _, status = os.waitpid(first.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "the first run ended before it could be killed"
    count = len(stored(out))  # whole units: stored() parses each
    assert 4 <= count < UNITS, "the first run stored every unit before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {p: p.stat().st_mtime_ns for p in out.glob("units/*/*.json")}
    assert len(before) == count  # a temporary the kill interrupted may remain until the
    # rerun sweeps it, which check_complete verifies
    rerun = atlas(*args)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert f"{UNITS - count} done, 0 failed, {count} already stored" in output, output
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())
    check_complete(out, UNITS)


def test_failing_units_are_stored_as_failed_and_the_rest_completes(cluster, tmp_path):
    out = tmp_path / "atlas"
    run = atlas(
        "run",
        "tinymodels:flaky",
        "--layers",
        "conv1",
        "--layers",
        "conv2",
        "--channels",
        "0-1",
        "--classes",
        "",
        "--steps",
        "3",
        "--size",
        "32",
        "--batch",
        "2",
        "--scheduler-file",
        str(cluster["file"]),
        "--out",
        str(out),
    )
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 1, output
    assert "2 done, 2 failed" in output
    records = {r["id"]: r for r in stored(out)}
    assert records["conv1:0"]["status"] == records["conv1:1"]["status"] == "done"
    assert records["conv2:0"]["status"] == "failed"
    assert "simulated CUDA out of memory" in records["conv2:0"]["error"]


def test_the_default_local_cluster_runs_an_atlas_and_its_exemplars(tmp_path):
    """The visualizations and the exemplar pass on a real LocalCluster worker process."""
    out, photos = tmp_path / "atlas", tmp_path / "photos"
    photos.mkdir()
    make_image_folder(photos, count=20)
    run = atlas(
        "run",
        "tinymodels:tiny",
        "--layers",
        "conv2",
        "--channels",
        "0-3",
        "--classes",
        "0-1",
        "--steps",
        "3",
        "--size",
        "32",
        "--exemplars",
        str(photos),
        "--out",
        str(out),
    )
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    assert "6 done, 0 failed" in output
    assert "exemplars: 21 images (1 unreadable, skipped) for 6 units" in output
    check_complete(out, 6)
    record = json.loads((out / "exemplars/conv2/3.json").read_text())
    assert len(record["items"]) == 6 and all((out / i["image"]).is_file() for i in record["items"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--scheduler", "tcp://127.0.0.1:9"],
            "cannot reach the Dask scheduler at tcp://127.0.0.1:9",
        ),
        (["--scheduler-file", "/nonexistent/scheduler.json"], "scheduler file /nonexistent"),
    ],
)
def test_unreachable_schedulers_are_clear_errors(tmp_path, flags, message):
    run = atlas(
        "run",
        "tinymodels:tiny",
        "--layers",
        "conv1",
        "--classes",
        "",
        "--steps",
        "2",
        *flags,
        "--out",
        str(tmp_path / "out"),
    )
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 2, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, output
    assert "Traceback" not in output
