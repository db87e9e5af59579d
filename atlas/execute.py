"""Runs tasks: in-process (`inline`), on a local Dask cluster, on an existing one, or on
worker jobs that a batch scheduler runs (`--cluster slurm`, atlas.slurm).

The model is loaded once per worker by a worker plugin (never pickled into tasks); at most a
bounded number of tasks is in flight; failed tasks are retried, and a worker that dies has its
task rerun elsewhere by the scheduler. Results arrive at the client, which stores them. This
module knows Dask and tasks, not what a task computes: that is `optimize.optimize_task`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from atlas.errors import AtlasError

if TYPE_CHECKING:
    from atlas.config import AtlasConfig

RETRIES = 2  # a task that raises is tried this many more times before its units fail
CONNECT_TIMEOUT = "10s"
WORKER_WAIT = "10m"  # batch queues can take a while to start the first worker
_MODELS_ATTRIBUTE = "_atlas_models"


def visible_gpus() -> int:
    """GPUs this process may use, counted without initializing CUDA in the client."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def worker_device() -> str:
    """'cuda' or 'cpu': the device kind of the process this runs in (run on workers)."""
    from atlas.optim.device import resolve_device

    return resolve_device().type


def load_model_here(spec: str, weights: str | None, identity: str):
    """Load the model in this process and check it is the one the client planned with: the
    same weights, read with the same preprocessing (LoadedModel.identity)."""
    from atlas import models

    model = models.load(spec, weights)
    if model.identity != identity:
        raise RuntimeError(
            f"the worker's {spec} is {model.identity} (weights digest, then preprocessing), "
            f"the plan's {identity}: the weights file or the preprocessing differs between the "
            "client and this worker"
        )
    return model


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker process (also on workers that join later)."""

    def __init__(self, spec: str, weights: str | None, identity: str):
        self.spec, self.weights, self.digest = spec, weights, identity

    def setup(self, worker) -> None:
        models = getattr(worker, _MODELS_ATTRIBUTE, {})
        models[self.digest] = load_model_here(self.spec, self.weights, self.digest)
        setattr(worker, _MODELS_ATTRIBUTE, models)

    def teardown(self, worker) -> None:
        getattr(worker, _MODELS_ATTRIBUTE, {}).pop(self.digest, None)


def _run_on_worker(function: Callable, digest: str, task) -> dict:
    from distributed import get_worker

    worker = get_worker()
    model = getattr(worker, _MODELS_ATTRIBUTE, {}).get(digest)
    if model is None:
        raise RuntimeError("the atlas model plugin did not load the model on this worker")
    return function(model, task)


class Job(Protocol):
    """What an executor runs: a picklable task that names itself (uniquely within a run)."""

    @property
    def name(self) -> str: ...


@dataclass
class Outcome:
    """What happened to one task: its result, or the error that ended its retries."""

    task: Job
    result: dict | None = None
    error: str | None = None


class Executor(Protocol):
    """A place to compute tasks: this process or a Dask cluster. `map` calls
    `function(model, task)` where the model is loaded (once per process), yields one Outcome
    per task as they finish, and never raises for a task that failed."""

    workers: int  # how many tasks can be computed at once
    device: str  # "cuda" or "cpu": what the workers compute on (it sizes batches)
    dashboard_link: str | None

    def map(
        self, function: Callable[[object, Job], dict], tasks: Iterable[Job]
    ) -> Iterator[Outcome]: ...


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip(": ")


class InlineExecutor:
    """Computes tasks one after another in this process (no Dask): for debugging."""

    dashboard_link = None

    def __init__(self, model):
        self.model = model
        self.workers = 1
        self.device = worker_device()

    def map(self, function: Callable, tasks: Iterable) -> Iterator[Outcome]:
        for task in tasks:
            try:
                yield Outcome(task, result=function(self.model, task))
            except Exception as error:  # the unit fails, the run goes on
                yield Outcome(task, error=_one_line(error))


class DaskExecutor:
    """Computes tasks on a Dask cluster that has a worker, a bounded window of them in flight:
    two per worker, counting the `planned` workers that have not joined yet (batch jobs still
    queued), so that each has work the moment it joins."""

    def __init__(self, client, model, weights: str | None, planned: int = 0):
        self.client = client
        self.digest = model.identity  # the plugin's models are held by identity
        # in every task's key: Dask merges equal keys, and another run on a shared scheduler
        # may name a task as this one does (the same images, another model or dictionary)
        self.run = uuid.uuid4().hex[:8]
        plugin = ModelPlugin(model.spec, weights, self.digest)
        try:
            client.register_plugin(plugin, name=f"atlas-model-{self.digest}")
        except Exception as error:
            message = f"the Dask workers could not load {model.spec}: {_one_line(error)}"
            raise AtlasError(message) from None
        self.workers = max(1, planned, len(client.scheduler_info().get("workers", {})))
        self.dashboard_link = _dashboard_link(client)
        devices = set(client.run(worker_device).values())
        self.device = "cuda" if devices == {"cuda"} else "cpu"

    def map(self, function: Callable, tasks: Iterable) -> Iterator[Outcome]:
        from distributed import as_completed

        pending = iter(tasks)
        in_flight: dict = {}
        completed = as_completed()
        window = 2 * self.workers + 2

        def submit_next() -> None:
            task = next(pending, None)
            if task is None:
                return
            future = self.client.submit(
                _run_on_worker,
                function,
                self.digest,
                task,
                key=f"atlas-{self.run}-{task.name}",
                pure=False,
                retries=RETRIES,
            )
            in_flight[future] = task
            completed.add(future)

        for _ in range(window):
            submit_next()
        for future in completed:
            task = in_flight.pop(future)
            if future.status == "finished":
                yield Outcome(task, result=future.result())
            elif future.status == "cancelled":
                yield Outcome(task, error="cancelled by the scheduler")
            else:
                yield Outcome(task, error=_one_line(future.exception()))
            future.release()
            submit_next()


def _dashboard_link(client) -> str | None:
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
    except ImportError:
        return None
    return client.dashboard_link


def _worker_environ(workers: int) -> dict[str, str]:
    """Dask's default worker environment, fixed for torch: Dask pins BLAS/OpenMP to one
    thread, and its MALLOC_TRIM_THRESHOLD_ turns off glibc's dynamic mmap threshold, so every
    large tensor is mmapped and unmapped each step (measured here on Lite0: 2.5x slower than
    in-process, most of it system time). Here the cores are shared by the local workers."""
    threads = str(max(1, _cpu_count() // workers))
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return dict.fromkeys(names, threads)


def _local_cluster():
    """One single-threaded worker process per visible GPU, pinned to it; or one worker that
    uses all CPU cores when there is no GPU."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    # A free port, never the default 8787: another run may hold it (distributed then warns).
    # Without bokeh there is no dashboard, only the scheduler's small HTTP server.
    dashboard = ":0"
    gpus = visible_gpus()
    with dask.config.set({"distributed.nanny.pre-spawn-environ": _worker_environ(gpus or 1)}):
        if gpus == 0:
            return LocalCluster(
                n_workers=1,
                threads_per_worker=1,
                processes=True,
                dashboard_address=dashboard,
                silence_logs=logging.ERROR,
            )
        try:
            from dask_cuda import LocalCUDACluster

            return LocalCUDACluster(threads_per_worker=1, dashboard_address=dashboard)
        except ImportError:
            pass
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(gpus)]
        workers = {
            f"gpu-{device.strip()}": {
                "cls": Nanny,
                "options": {
                    "nthreads": 1,
                    "env": {"CUDA_VISIBLE_DEVICES": device.strip()},
                    "silence_logs": logging.ERROR,
                },
            }
            for device in devices
        }
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard}}
        return SpecCluster(scheduler=scheduler, workers=workers, silence_logs=logging.ERROR)


class Backend(Protocol):
    """How a run reaches the processes that compute its tasks. A backend is chosen by the
    run's settings (the first registered one that accepts them) and opens an Executor for the
    block, closing whatever it started afterwards; `on_cluster` hears what the cluster is
    doing when there is something to say (batch jobs waiting). A new backend is one
    registered class."""

    name: str

    @classmethod
    def accepts(cls, config: AtlasConfig) -> bool: ...

    def __init__(self, config: AtlasConfig) -> None: ...

    def executor(
        self, model, on_cluster: Callable[[str], None] | None = None
    ) -> AbstractContextManager[Executor]: ...


BACKENDS: list[type[Backend]] = []  # in the order they are asked whether they accept


def register_backend(backend: type[Backend]) -> type[Backend]:
    BACKENDS.append(backend)
    return backend


@register_backend
class InlineBackend:
    """This process, one task after another (no Dask): `--scheduler inline`."""

    name = "inline"

    @classmethod
    def accepts(cls, config: AtlasConfig) -> bool:
        return config.scheduler == "inline" and not config.scheduler_file

    def __init__(self, config: AtlasConfig) -> None:
        pass

    @contextmanager
    def executor(self, model, on_cluster=None) -> Iterator[Executor]:
        yield InlineExecutor(model)


class DaskBackend:
    """A Dask client of some cluster; `connect` says how. Workers load the model through the
    executor's plugin; the client and what `connect` started are closed after the block."""

    def __init__(self, config: AtlasConfig) -> None:
        self.config = config
        self.scheduler, self.scheduler_file = config.scheduler, config.scheduler_file

    def connect(self, stack: ExitStack, on_cluster: Callable[[str], None] | None):
        """A distributed.Client; clusters it starts are closed by `stack`."""
        raise NotImplementedError

    def wait_for_workers(self, client) -> None:
        """Return once a worker has joined; AtlasError when none will."""
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT)
        except TimeoutError:
            raise AtlasError(f"no Dask worker joined the scheduler within {WORKER_WAIT}") from None

    planned = 0  # workers still to join that the executor should keep busy

    @contextmanager
    def executor(self, model, on_cluster=None) -> Iterator[Executor]:
        with ExitStack() as stack:
            try:
                client = self.connect(stack, on_cluster)
            except AtlasError:
                raise
            except (OSError, TimeoutError, ValueError) as error:
                where = self.scheduler_file or self.scheduler
                raise AtlasError(
                    f"cannot reach the Dask scheduler at {where}: {_one_line(error)}"
                ) from None
            stack.callback(client.close)
            self.wait_for_workers(client)
            yield DaskExecutor(client, model, self.config.weights, self.planned)


@register_backend
class SlurmBackend(DaskBackend):
    """Worker jobs on SLURM through dask-jobqueue (`--cluster slurm`, the [cluster] table):
    submitted for the run, watched while they queue, resubmitted when the scheduler loses
    them (scancel, walltime), cancelled at the end and on Ctrl-C (atlas.slurm)."""

    name = "slurm"

    @classmethod
    def accepts(cls, config: AtlasConfig) -> bool:
        return config.cluster is not None and config.cluster.kind == "slurm"

    def connect(self, stack: ExitStack, on_cluster: Callable[[str], None] | None):
        from atlas import slurm

        self.jobs = stack.enter_context(slurm.worker_jobs(self.config.cluster, on_cluster))
        self.planned = self.config.cluster.most_jobs * self.config.cluster.workers_per_job
        return self.jobs.client()

    def wait_for_workers(self, client) -> None:
        self.jobs.wait_for_worker(client, WORKER_WAIT)


@register_backend
class SchedulerFileBackend(DaskBackend):
    """A running cluster named by its scheduler file (`dask scheduler --scheduler-file`,
    dask-jobqueue, dask-mpi): `--scheduler-file PATH`."""

    name = "scheduler-file"

    @classmethod
    def accepts(cls, config: AtlasConfig) -> bool:
        return bool(config.scheduler_file)

    def connect(self, stack: ExitStack, on_cluster=None):
        from distributed import Client

        if not Path(self.scheduler_file).is_file():
            raise AtlasError(f"scheduler file {self.scheduler_file} does not exist")
        return Client(scheduler_file=self.scheduler_file, timeout=CONNECT_TIMEOUT)


@register_backend
class LocalBackend(DaskBackend):
    """A Dask cluster on this machine, started for the run: `--scheduler local` (default)."""

    name = "local"

    @classmethod
    def accepts(cls, config: AtlasConfig) -> bool:
        return config.scheduler == "local"

    def connect(self, stack: ExitStack, on_cluster=None):
        from distributed import Client

        cluster = stack.enter_context(_local_cluster())
        return Client(cluster)


@register_backend
class AddressBackend(DaskBackend):
    """A running scheduler by its address: `--scheduler tcp://host:8786`."""

    name = "address"

    @classmethod
    def accepts(cls, config: AtlasConfig) -> bool:
        return True  # asked last: any other scheduler setting is an address

    def connect(self, stack: ExitStack, on_cluster=None):
        from distributed import Client

        return Client(self.scheduler, timeout=CONNECT_TIMEOUT)


def executor(
    config: AtlasConfig, model, on_cluster: Callable[[str], None] | None = None
) -> AbstractContextManager[Executor]:
    """An executor for the configured scheduler or cluster, from the first backend that
    accepts it; workers load the model again from `config.weights` (None: its default)."""
    chosen = next(b for b in BACKENDS if b.accepts(config))
    return chosen(config).executor(model, on_cluster)
