"""The [cluster] table and --cluster: settings checked in one line, the worker job script that
dask-jobqueue writes from them, the line that says what the jobs are doing, and the pinning of
the workers of a several-GPU job (real Dask workers). The jobs themselves run in
tests/test_slurm.py."""

import os
import subprocess
import sys

import pytest
from clihelpers import assert_bad_input, invoke
from test_execute import DASK, environment, wait_for

from atlas import config
from atlas.cluster import ClusterConfig
from atlas.errors import AtlasError
from atlas.slurm import cluster_options, describe

RUN = ["run", "tinymodels:tiny", "--layers", "conv1", "--classes", "", "--steps", "2"]


def cluster_of(tmp_path, table: str, **flags) -> ClusterConfig | None:
    path = tmp_path / "atlas.toml"
    path.write_text(f'model = "tinymodels:tiny"\nout = "{tmp_path / "out"}"\n{table}')
    return config.build(str(path), **flags).cluster


def test_a_cluster_table_or_the_flag_chooses_slurm_and_logs_go_to_out(tmp_path):
    assert cluster_of(tmp_path, "") is None
    found = cluster_of(tmp_path, "", cluster="slurm")
    assert found == ClusterConfig(logs=str(tmp_path / "out" / "slurm-logs"))
    table = '[cluster]\npartition = "gpu"\nmax_jobs = 8\ngpus = 2\nsbatch = "--qos=low"\n'
    found = cluster_of(tmp_path, table)
    assert (found.kind, found.partition, found.sbatch) == ("slurm", "gpu", ("--qos=low",))
    assert found.adaptive and found.most_jobs == 8 and found.workers_per_job == 2


@pytest.mark.parametrize(
    "table, message",
    [
        ("[cluster]\njbos = 2", "[cluster] has no setting 'jbos' (did you mean: jobs"),
        ('[cluster]\nkind = "pbs"', "unknown cluster kind 'pbs'; kinds: slurm"),
        ('[cluster]\njobs = "4"', "[cluster] jobs must be a whole number"),
        ("[cluster]\njobs = 0", "[cluster] jobs must be at least 1"),
        ("[cluster]\njobs = 2\nmax_jobs = 4", "a fixed number or adaptive, not both"),
        ("[cluster]\nmin_jobs = 1", "min_jobs needs max_jobs"),
        ("[cluster]\nmin_jobs = 5\nmax_jobs = 4", "min_jobs must be from 0 to max_jobs"),
        ('[cluster]\nmemory = "lots"', "memory must be an amount such as 16GB, not 'lots'"),
        ('[cluster]\nwalltime = "4h"', "walltime must be a SLURM time such as 04:00:00"),
        ('[cluster]\nsbatch = ["qos=low"]', "sbatch lines are options such as --account"),
        ("[cluster]\nprologue = [1]", "[cluster] prologue must be a list of strings"),
        ('cluster = "slurm"', "[cluster] must be a table"),
        ('scheduler = "inline"\n[cluster]', "both a cluster and a scheduler are given"),
    ],
)
def test_bad_cluster_settings_are_named(tmp_path, table, message):
    with pytest.raises(AtlasError) as raised:
        cluster_of(tmp_path, table)
    assert message in str(raised.value)


def test_bad_settings_end_the_command_in_one_line(tmp_path):
    (tmp_path / "atlas.toml").write_text('[cluster]\nwalltime = "soon"\n')
    found = invoke(*RUN, "--config", tmp_path / "atlas.toml", "--out", tmp_path / "out")
    assert_bad_input(found, "walltime must be a SLURM time")


def test_without_dask_jobqueue_the_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if it were not installed
    found = invoke(*RUN, "--cluster", "slurm", "--out", tmp_path / "out")
    assert_bad_input(found, "needs dask-jobqueue", "pip install 'atlas[slurm]'")


def test_the_worker_job_script_asks_for_what_the_table_says(tmp_path, monkeypatch):
    """dask-jobqueue's own script from atlas's options: a job of 2 GPUs runs 2 single-threaded
    workers pinned by the preload, each with 4 of the job's 8 cores for torch."""
    from dask_jobqueue import SLURMCluster

    monkeypatch.setenv("PYTHONPATH", "/shared/models")
    settings = ClusterConfig(partition="gpu", cores=8, memory="64GB", gpus=2, walltime="2:00:00",
                             sbatch=("--qos=low",), prologue=("module load cuda",),
                             python="/shared/venv/bin/python", logs=str(tmp_path))  # fmt: skip
    with SLURMCluster(**cluster_options(settings)) as cluster:
        script = cluster.job_script()
    for line in ["#SBATCH -J atlas-worker", "#SBATCH -p gpu", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=60G", "#SBATCH -t 2:00:00", "#SBATCH --gres=gpu:2",
                 "#SBATCH --qos=low", f"#SBATCH -e {tmp_path}/atlas-worker-%J.err",
                 "export OMP_NUM_THREADS=4", "export PYTHONPATH=/shared/models",
                 "export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False",
                 "module load cuda"]:  # fmt: skip
        assert line in script.splitlines(), (line, script)
    command = script.strip().splitlines()[-1]
    assert command.startswith("/shared/venv/bin/python -m distributed.cli.dask_worker")
    assert "--nthreads 1 " in command and "--nworkers 2 --nanny" in command
    assert "--preload atlas.slurm" in command


def test_a_cpu_job_runs_one_worker_without_a_nanny(tmp_path):
    from dask_jobqueue import SLURMCluster

    settings = ClusterConfig(cores=4, logs=str(tmp_path))
    with SLURMCluster(**cluster_options(settings)) as cluster:
        script = cluster.job_script()
    assert "export OMP_NUM_THREADS=4" in script
    assert "gres" not in script and "--preload" not in script
    assert "--nthreads 1 " in script and "--no-nanny" in script and "--nworkers" not in script


def test_the_jobs_line_counts_running_pending_and_ended():
    states = {
        "7": ("RUNNING", "gpu", "None"),
        "8": ("RUNNING", "gpu", "None"),
        "9": ("PENDING", "gpu", "Resources"),
        "10": ("PENDING", "gpu", "Priority"),
    }
    assert describe(states, 4) == (
        "2 of 4 worker jobs running, 2 pending in partition gpu (Priority, Resources)"
    )
    assert describe({"7": ("RUNNING", "gpu", "None")}, 2) == "1 of 2 worker jobs running, 1 ended"
    assert describe({"7": ("COMPLETING", "debug", "None")}, 1) == (
        "0 of 1 worker jobs running, 1 ended"
    )


@pytest.mark.slow  # processes
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
            visible = client.run(os.getenv, "CUDA_VISIBLE_DEVICES")
    finally:
        for process in started:
            process.kill()
            process.wait()
    assert {names[address]: devices for address, devices in visible.items()} == {
        "job-7-0": "3",
        "job-7-1": "5",
    }
