"""The [cluster] table of atlas.toml (or `--cluster slurm`): worker jobs on a batch scheduler,
as settings checked here, so that a typo is one line before any job is submitted.

    [cluster]
    kind = "slurm"            # the one kind so far (the default)
    partition = "gpu"         # default: the scheduler's default partition
    jobs = 4                  # worker jobs, a fixed number; or adaptive between these two:
    min_jobs = 0
    max_jobs = 8
    cores = 4                 # CPU cores per job (the worker's torch threads)
    memory = "32GB"           # per job
    gpus = 1                  # per job, as --gres=gpu:N: one worker per GPU
    walltime = "04:00:00"
    sbatch = ["--account=vision", "--qos=normal"]     # more #SBATCH lines
    prologue = ["module load cuda/12", "source /shared/venv/bin/activate"]
    python = "/shared/venv/bin/python"                # the workers' interpreter
    interface = "ib0"         # the network the workers reach the scheduler on
    logs = "/shared/atlas-logs"                       # job logs; default OUT/slurm-logs
    name = "atlas-resnet50"   # the jobs' name in squeue (default atlas-worker)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

from atlas.errors import AtlasError, did_you_mean

KINDS = ("slurm",)
LOGS = "slurm-logs"  # the job logs' folder in OUT, unless `logs` says otherwise
# SLURM's time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes and days-hours:minutes:seconds
_NAME = re.compile(r"^[\w.-]+$")
_WALLTIME = re.compile(r"^(\d+-\d+(:\d+(:\d+)?)?|\d+(:\d+){0,2})$")


@dataclass(frozen=True)
class ClusterConfig:
    """Where worker jobs run and what each asks for; every job runs one single-threaded
    worker per GPU (one worker on a job without GPUs) that loads the model once."""

    kind: str = "slurm"
    partition: str | None = None
    jobs: int = 1
    min_jobs: int | None = None  # set with max_jobs: adaptive between the two
    max_jobs: int | None = None
    cores: int = 1
    memory: str = "8GB"
    gpus: int = 0
    walltime: str = "01:00:00"
    sbatch: tuple[str, ...] = ()
    prologue: tuple[str, ...] = ()
    python: str | None = None  # default: the interpreter that runs atlas
    interface: str | None = None
    logs: str = ""
    name: str = "atlas-worker"  # the jobs' name: runs at once are told apart by it

    @property
    def adaptive(self) -> bool:
        return self.max_jobs is not None

    @property
    def workers_per_job(self) -> int:
        return max(1, self.gpus)

    @property
    def most_jobs(self) -> int:
        return self.max_jobs if self.max_jobs is not None else self.jobs


_TYPES = {f.name: f.type for f in fields(ClusterConfig)}
_NUMBERS = ("jobs", "min_jobs", "max_jobs", "cores", "gpus")
_LISTS = ("sbatch", "prologue")


def _checked(key: str, value) -> object:
    """A table value of the right kind (lists as tuples), or AtlasError naming the key."""
    if key in _NUMBERS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise AtlasError(f"[cluster] {key} must be a whole number")
        return value
    if key in _LISTS:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise AtlasError(f"[cluster] {key} must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise AtlasError(f"[cluster] {key} must be a string")
    return value


def cluster_config(table: dict | None, kind: str | None, out: str) -> ClusterConfig | None:
    """The cluster of the [cluster] table and the --cluster flag (None: neither given, the run
    stays on its scheduler); job logs default to OUT/slurm-logs."""
    if table is None and kind is None:
        return None
    if not isinstance(table or {}, dict):
        raise AtlasError("[cluster] must be a table")
    table = dict(table or {})
    unknown = sorted(set(table) - set(_TYPES))
    if unknown:
        raise AtlasError(
            f"[cluster] has no setting {unknown[0]!r}{did_you_mean(unknown[0], _TYPES)}"
        )
    values = {key: _checked(key, value) for key, value in table.items()}
    if kind is not None:
        values["kind"] = kind
    values.setdefault("logs", str(Path(out) / LOGS))
    config = ClusterConfig(**values)
    _check(config, table)
    return config


def _check(config: ClusterConfig, table: dict) -> None:
    if config.kind not in KINDS:
        raise AtlasError(f"unknown cluster kind {config.kind!r}; kinds: {', '.join(KINDS)}")
    if "jobs" in table and config.adaptive:
        raise AtlasError("[cluster] sets jobs and max_jobs: a fixed number or adaptive, not both")
    if config.min_jobs is not None and config.max_jobs is None:
        raise AtlasError("[cluster] min_jobs needs max_jobs (adaptive between the two)")
    from dask.utils import parse_bytes

    try:
        memory = parse_bytes(config.memory)
    except (ValueError, TypeError):
        memory = 0
    checks = [
        (config.jobs >= 1, "[cluster] jobs must be at least 1"),
        (config.max_jobs is None or config.max_jobs >= 1, "[cluster] max_jobs must be at least 1"),
        (
            config.min_jobs is None or 0 <= config.min_jobs <= (config.max_jobs or 0),
            "[cluster] min_jobs must be from 0 to max_jobs",
        ),
        (config.cores >= 1, "[cluster] cores must be at least 1"),
        (config.gpus >= 0, "[cluster] gpus must be 0 or more"),
        (memory > 0, f"[cluster] memory must be an amount such as 16GB, not {config.memory!r}"),
        (
            bool(_WALLTIME.match(config.walltime)),
            f"[cluster] walltime must be a SLURM time such as 04:00:00 or 1-00:00:00, "
            f"not {config.walltime!r}",
        ),
        (
            all(line.startswith("-") for line in config.sbatch),
            "[cluster] sbatch lines are options such as --account=vision",
        ),
        (config.partition != "", "[cluster] partition must not be empty"),
        (
            bool(_NAME.match(config.name)),
            "[cluster] name must be letters, digits, '.', '_' or '-'",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise AtlasError(message)
