"""Worker jobs on SLURM: a dask-jobqueue SLURMCluster made from the [cluster] table, its job
script checked by `sbatch --test-only` before any job is submitted; while the run lasts its
jobs are watched with squeue (what they are doing, for the progress line; jobs whose workers
Dask lost, to scancel or the walltime, are submitted again), and when it ends, however it ends,
every job it submitted is cancelled. Also the preload that pins each worker of a several-GPU
job to one GPU.

The worker jobs run `python -m distributed.cli.dask_worker` with the interpreter that runs atlas
(or `python`), in the directory atlas was started in, with its environment (sbatch's default
--export=ALL) and its PYTHONPATH: the interpreter, atlas, the model's module and the weights
file must be at the same paths on the compute nodes (a shared file system).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dask

from atlas.cluster import ClusterConfig
from atlas.errors import AtlasError, did_you_mean

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
# Dask drops a job whose worker left after this long (its default: 15s); only then is it
# submitted again
LOST_WORKER_TIMEOUT = "1s"
PENDING = ("PENDING", "CONFIGURING", "REQUEUED")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# A worker's memory is SLURM's to limit (--mem): Dask's own thresholds are for data it can
# spill, and pausing at 80% stalls for good a worker whose torch alone is that large
MEMORY_SETTINGS = ("TARGET", "SPILL", "PAUSE", "TERMINATE")
COMMAND_TIMEOUT = 60  # seconds for one sbatch, squeue, sinfo or scancel
SUBMIT_TIMEOUT = 2 * COMMAND_TIMEOUT  # seconds until the first job must have an id


def _slurm(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AtlasError(f"SLURM's {args[0]} did not answer within {COMMAND_TIMEOUT} s") from None


def _refusal(stderr: str) -> str:
    """SLURM's reason in a command's stderr: its first error, without the 'sbatch: error: '."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line]
    return (errors or lines or ["no reason given"])[0]


def cluster_class():
    """dask-jobqueue's SLURMCluster, once the SLURM commands it runs are known to be here.
    Importing dask-jobqueue 0.9.0 makes Ctrl-C a silent sys.exit() (dask/dask-jobqueue#696):
    the handler it replaces is put back, so that Ctrl-C still ends a run as interrupted."""
    in_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise AtlasError(
            "--cluster slurm needs dask-jobqueue: pip install 'atlas[slurm]'"
        ) from None
    finally:
        if in_main and handler is not None:
            signal.signal(signal.SIGINT, handler)
    for command in ("sbatch", "squeue", "scancel", "sinfo"):
        if shutil.which(command) is None:
            raise AtlasError(
                f"--cluster slurm needs SLURM's {command}, which is not on PATH: run atlas "
                "where jobs are submitted (a login node)"
            )
    return SLURMCluster


def cluster_options(config: ClusterConfig) -> dict:
    """SLURMCluster's arguments: one job per worker on a CPU (`cores` torch threads, no
    nanny, so that Dask's nanny neither pins them to one thread nor sets the malloc threshold
    that makes torch slow), or one single-threaded worker per GPU."""
    workers = config.workers_per_job
    threads = max(1, config.cores // workers)
    prologue = [f"export {name}={threads}" for name in THREAD_VARIABLES]
    prologue += [f"export DASK_DISTRIBUTED__WORKER__MEMORY__{s}=False" for s in MEMORY_SETTINGS]
    if os.environ.get("PYTHONPATH"):  # the model's module, even where jobs start afresh
        prologue.append(f"export PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])}")
    return {
        "queue": config.partition,
        "cores": workers,  # Dask threads: one per worker
        "processes": workers,
        "job_cpu": config.cores,
        "memory": config.memory,
        "walltime": config.walltime,
        "job_name": config.name,
        "job_extra_directives": [f"--gres=gpu:{config.gpus}"] * bool(config.gpus)
        + list(config.sbatch),
        "job_script_prologue": prologue + list(config.prologue),
        "python": config.python or sys.executable,
        "interface": config.interface,
        "log_directory": config.logs,
        "nanny": workers > 1,
        "worker_extra_args": ["--preload", "atlas.slurm"] if workers > 1 else [],
        "scheduler_options": {"dashboard_address": ":0"},  # any free port, never 8787's
        "silence_logs": logging.ERROR,
    }


def check_partition(partition: str | None) -> None:
    """An unknown partition, named with the ones there are (sbatch would only say 'invalid')."""
    if partition is None:
        return
    listed = _slurm("sinfo", "-h", "-o", "%R")
    if listed.returncode != 0:
        raise AtlasError(f"sinfo cannot list SLURM's partitions: {_refusal(listed.stderr)}")
    names = sorted(set(listed.stdout.split()))
    if partition not in names:
        hint = did_you_mean(partition, names)
        raise AtlasError(
            f"SLURM has no partition {partition!r}{hint}; partitions: {', '.join(names)}"
        )


def check_job_script(script: str) -> None:
    """`sbatch --test-only` on the worker job: what SLURM would refuse (memory or GPUs no
    node has, a bad extra line, an account) is one line before anything is submitted."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="atlas-worker-") as handle:
        handle.write(script)
        handle.flush()
        tested = _slurm("sbatch", "--test-only", handle.name)
    if tested.returncode != 0:
        raise AtlasError(f"sbatch refuses the worker job: {_refusal(tested.stderr)}")


def squeue(ids: set[str], name: str) -> dict[str, tuple[str, str, str]]:
    """State, partition and reason of those of `ids` (jobs named `name`) that SLURM still
    lists."""
    if not ids:
        return {}
    listed = _slurm("squeue", "-h", "-n", name, "-o", "%i|%T|%P|%r")
    if listed.returncode != 0:
        raise RuntimeError(f"squeue failed: {_refusal(listed.stderr)}")
    rows = (line.split("|", 3) for line in listed.stdout.splitlines() if line.count("|") == 3)
    return {row[0]: (row[1], row[2], row[3]) for row in rows if row[0] in ids}


def describe(states: dict[str, tuple[str, str, str]], total: int) -> str:
    """'2 of 4 worker jobs running, 2 pending in partition gpu (Resources)'."""
    running = sum(state == "RUNNING" for state, _, _ in states.values())
    pending = [(partition, reason) for state, partition, reason in states.values()
               if state in PENDING]  # fmt: skip
    line = f"{running} of {total} worker jobs running"
    if pending:
        partitions = sorted({partition for partition, _ in pending})
        reasons = sorted({reason for _, reason in pending if reason and reason != "None"})
        line += f", {len(pending)} pending in partition {', '.join(partitions)}"
        line += f" ({', '.join(reasons)})" if reasons else ""
    ended = total - running - len(pending)  # completing, or gone from squeue
    return line + (f", {ended} ended" if ended > 0 else "")


class WorkerJobs:
    """The run's worker jobs: started, watched every POLL_SECONDS on a thread (a line for
    `on_cluster` when it changes; lost jobs submitted again) and, on `cancel`, ended."""

    def __init__(self, cluster, config: ClusterConfig, on_cluster: Callable[[str], None] | None):
        self.cluster, self.config, self.on_cluster = cluster, config, on_cluster
        self.submitted: set[str] = set()  # every job id seen: each is cancelled at the end
        self.polled: set[str] = set()  # the ids the last poll asked about
        self.states: dict[str, tuple[str, str, str]] = {}  # of those squeue still lists
        self.line: str | None = None
        self.running_since: float | None = None  # when a job was first seen running
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="atlas-slurm", daemon=True)

    def start(self) -> None:
        if self.config.adaptive:
            self.cluster.adapt(minimum_jobs=self.config.min_jobs or 0,
                               maximum_jobs=self.config.max_jobs)  # fmt: skip
        else:
            self.cluster.scale(jobs=self.config.jobs)
        self.watcher.start()

    def client(self):
        from distributed import Client

        return Client(self.cluster)

    def job_ids(self) -> set[str]:
        return {job.job_id for job in list(self.cluster.workers.values()) if job.job_id}

    def poll(self) -> None:
        """Read the jobs' states; report them when they changed; submit again the jobs whose
        workers Dask lost (it keeps wanting as many as before)."""
        ids = self.job_ids()
        self.submitted |= ids
        self.states, self.polled = squeue(ids, self.config.name), ids
        if self.running_since is None and any(s == "RUNNING" for s, _, _ in self.states.values()):
            self.running_since = time.monotonic()
        line = describe(self.states, len(ids))
        if ids and line != self.line:
            self.line = line
            if self.on_cluster:
                self.on_cluster(line)
        lost = set(self.cluster.worker_spec) - set(self.cluster.workers)
        if lost and not self.stop.is_set():
            log.info("submitting %d worker jobs again", len(lost))
            self.cluster.scale(jobs=len(self.cluster.worker_spec))

    def _watch(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            try:
                self.poll()
            except Exception as error:  # a slow or failing squeue: try again next time
                log.warning("watching the worker jobs: %s", error)

    def wait_for_worker(self, client, timeout: str) -> None:
        """Return once a worker has joined, however long its jobs queue (the progress line
        says so); AtlasError when every job ended first, or when one has run for `timeout`
        and no worker reached the scheduler."""
        from dask.utils import parse_timedelta

        limit = parse_timedelta(timeout)
        waiting_since = time.monotonic()
        while not client.scheduler_info().get("workers"):
            ids = self.job_ids()
            if not ids and time.monotonic() - waiting_since > SUBMIT_TIMEOUT:
                # dask-jobqueue keeps a job whose sbatch failed, without an id: it never runs
                raise AtlasError(
                    f"no worker job was submitted within {SUBMIT_TIMEOUT} s: sbatch failed "
                    "after accepting the job script (SLURM's controller busy, a submit "
                    "limit?); the log above has SLURM's words"
                )
            if ids and ids <= self.polled and not ids & set(self.states):
                raise AtlasError(f"the worker jobs ended before a worker joined: {self.why()}")
            if self.running_since and time.monotonic() - self.running_since > limit:
                raise AtlasError(
                    f"a worker job has run for {timeout} and no worker reached the scheduler at "
                    f"{self.cluster.scheduler_address} (set [cluster] interface?): {self.why()}"
                )
            time.sleep(0.2)

    def why(self) -> str:
        """The last line a worker job wrote to its error log, and where the logs are."""
        pattern = f"{self.config.name}-*.err"
        logs = sorted(Path(self.config.logs).glob(pattern), key=os.path.getmtime)
        for path in reversed(logs):
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return f"{lines[-1].strip()} ({path})"
        return f"no job wrote an error; logs in {self.config.logs}"

    def cancel(self) -> None:
        """End the watch and every job, through Dask and then by scancel of any job it
        missed, so that nothing is left in squeue; a second Ctrl-C or SIGTERM meanwhile
        waits until it is done."""
        with _uninterrupted():
            self._cancel()

    def _cancel(self) -> None:
        self.stop.set()
        if self.watcher.is_alive():
            self.watcher.join(timeout=COMMAND_TIMEOUT)
        self.submitted |= self.job_ids()
        try:
            self.cluster.close()
        finally:
            try:
                left = set(squeue(self.submitted, self.config.name))
            except (AtlasError, RuntimeError):  # no answer: cancel them all to be sure
                left = self.submitted
            if left:
                _slurm("scancel", *sorted(left))


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM ignored for the block (in the main thread, where handlers are set):
    cancelling the jobs must not be cut short by the signal that asked for it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, left as it is
                signal.signal(sig, handler)


@contextmanager
def _interrupted_by_sigterm() -> Iterator[None]:
    """SIGTERM (a batch job's own time limit, `kill`) ends the run like Ctrl-C does, so that
    the worker jobs are cancelled; only in the main thread, where handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signal, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def worker_jobs(
    config: ClusterConfig, on_cluster: Callable[[str], None] | None
) -> Iterator[WorkerJobs]:
    """The run's worker jobs, submitted once sbatch has accepted their script; all cancelled
    when the block ends."""
    SLURMCluster = cluster_class()
    check_partition(config.partition)
    try:
        Path(config.logs).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AtlasError(
            f"cannot make the job logs folder {config.logs}: {error.strerror}"
        ) from None
    lost_after = {"distributed.deploy.lost-worker-timeout": LOST_WORKER_TIMEOUT}
    with dask.config.set(lost_after), _interrupted_by_sigterm():
        jobs = WorkerJobs(SLURMCluster(**cluster_options(config)), config, on_cluster)
        try:
            check_job_script(jobs.cluster.job_script())
            jobs.start()
            yield jobs
        finally:
            jobs.cancel()


def dask_setup(worker) -> None:
    """Dask's preload hook (`--preload atlas.slurm`, on jobs of several GPUs): worker k of a
    job, named '<job>-k' by `dask worker --nworkers`, computes on the k-th of the GPUs SLURM
    gave the job; set before CUDA starts in this process."""
    devices = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    devices = [d for d in devices if d]
    index = str(worker.name).rpartition("-")[2]
    if devices and index.isdigit():
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(index) % len(devices)]
