"""The `atlas run` pipeline: config -> plan -> store (skip what is done) -> execute (the units,
then the passes) -> manifest -> site.

The client loads the model once (CPU only, never CUDA) to discover layers and the weights
digest; workers load it again through the executor's plugin. Every finished task is stored at
once, so a run killed at any instant loses at most the tasks in flight, and the rerun does only
what is missing. With --concepts or --activation-atlas the learning step (atlas.learning) comes
first: the plan's concepts and cells are what it learned. The executor starts when there is
work for it: an unchanged rerun starts none.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch

import atlas
from atlas.config import AtlasConfig
from atlas.errors import AtlasError
from atlas.execute import Executor, executor
from atlas.files import naming_unwritable, writable_folder
from atlas.history import Checkpoint, History
from atlas.learning import Learning
from atlas.optimize import optimize_task, unit_record
from atlas.passes import PassSummary, pending_passes
from atlas.plan import (
    ENGINE_VERSION,
    Plan,
    Task,
    load_and_plan,
    make_plan,
    make_tasks,
)
from atlas.progress import Progress
from atlas.record import RunRecord
from atlas.rekey import made_before_keying, rekey
from atlas.site import render
from atlas.store import Store, layer_dirname, webp_problem

MANIFEST_EVERY_SECONDS = 60.0
# the folders of OUT a run writes to, proved writable before any work starts
WRITTEN_FOLDERS = ("units", "units/*", "exemplars", "exemplars/*", "checkpoints", "checkpoints/*")
WRITTEN_FOLDERS += ("blobs", "blobs/*", "site", "site/*", "concepts", "concepts/*")


@dataclass
class RunSummary:
    planned: int
    skipped: int
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    out: str = ""
    site: str = ""  # the atlas's index.html
    passes: list[PassSummary] = field(default_factory=list)  # what each pass did, in order
    rekeyed: int = 0  # units stored before preprocessing was keyed, kept (atlas.rekey)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def plan_record(
    plan: Plan, model, started: str, finished: str | None, checkpoint: Checkpoint | None = None
) -> dict:
    """plan.json: what this run planned, with what, and which checkpoint (default: the first
    of a new OUT)."""
    config = plan.config
    checkpoint = checkpoint or Checkpoint.first(1, model, config.label, started)
    run = RunRecord(
        spec=model.spec,
        digest=model.digest,
        weights=config.weights,
        preprocessing=model.preprocessing_facts(),
        recipe=config.recipe.name,
        recipe_hash=config.recipe.hash,
        recipe_settings=dataclasses.asdict(config.recipe),
        samples=config.samples,
        seed=config.seed,
        timelapse=config.timelapse,
        started=started,
        finished=finished,
        atlas_version=atlas.__version__,
        torch_version=torch.__version__,
        engine_version=ENGINE_VERSION,
        layers=tuple(
            {**layer.as_dict(), "dir": layer_dirname(layer.name)} for layer in plan.layers
        ),
        labels=tuple(model.labels or ()),
        checkpoint=dataclasses.asdict(checkpoint),
    )
    return {**run.as_json(), "units": [unit.as_json() for unit in plan.units]}


def run_atlas(
    config: AtlasConfig,
    *,
    on_start: Callable[[int, int, str | None], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_cluster: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run the atlas described by `config`; returns counts. `on_start(todo, skipped, link)`,
    `on_progress` and `on_cluster` (what batch jobs are doing) feed a progress display."""
    model, plan = load_and_plan(config)
    store = Store(writable_folder(config.out, WRITTEN_FOLDERS))
    learning = Learning.for_run(config, model, plan, store)  # checks K, N and the layers first
    kept = "the units stored before are kept; rerun when it is writable"
    with (
        store.claimed(),
        naming_unwritable(store.out, kept),
        OnDemand(config, model, on_cluster) as pools,
    ):
        learnt = None  # what the learning step did, reported first
        if learning is not None:
            if learning.needed:
                learned, learnt = learning.learn(pools.get(), on_progress)
            else:
                learned = learning.stored()
            plan = make_plan(config, model, learned=learned)
        summary = _run_claimed(config, model, plan, store, pools, on_start, on_progress)
        if learnt is not None:
            summary.passes.insert(0, learnt)
            summary.failures[:0] = learnt.failures
        return summary


class OnDemand:
    """The run's executor, started on first use and closed with the block."""

    def __init__(self, config: AtlasConfig, model, on_cluster: Callable[[str], None] | None):
        self.config, self.model, self.on_cluster = config, model, on_cluster
        self.stack = ExitStack()
        self.pool: Executor | None = None

    def get(self) -> Executor:
        if self.pool is None:
            started = executor(self.config, self.model, self.on_cluster)
            self.pool = self.stack.enter_context(started)
        return self.pool

    def __enter__(self) -> OnDemand:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stack.__exit__(*exc_info)


def _run_claimed(
    config: AtlasConfig,
    model,
    plan: Plan,
    store: Store,
    pools: OnDemand,
    on_start: Callable[[int, int, str | None], None] | None,
    on_progress: Callable[[Progress], None] | None,
) -> RunSummary:
    started = now()
    history = store.history
    previous = _last_plan(store)
    checkpoint = history.begin(previous, model, config.label, started)
    before = {} if config.force else made_before_keying(store, plan, model, previous)
    store.write_plan(plan_record(plan, model, started, None, checkpoint))
    rekeyed = rekey(store, before)
    if config.prune:
        store.prune()
    todo = store.pending(plan.units, config.force)
    summary = RunSummary(
        len(plan.units), len(plan.units) - len(todo), out=str(store.out), rekeyed=rekeyed
    )
    clock = time.monotonic()
    passes_left = next(pending_passes(config, model, plan, store), None) is not None
    if todo or passes_left:  # passes left: e.g. the exemplars of a run killed before them
        pool = pools.get()
        if on_start:
            on_start(len(todo), summary.skipped, pool.dashboard_link)
        last_manifest = clock
        tasks = with_previous(make_tasks(plan, todo, pool.device), history, checkpoint)
        for outcome in pool.map(optimize_task, tasks):
            _store_outcome(store, outcome, summary, checkpoint.id)
            if time.monotonic() - last_manifest > MANIFEST_EVERY_SECONDS:
                store.write_manifest()
                last_manifest = time.monotonic()
            if on_progress:
                elapsed = time.monotonic() - clock
                on_progress(Progress(summary.done, summary.failed, len(todo), elapsed))
        for made in pending_passes(config, model, plan, store):  # they see the new units
            outcome = made.compute(pool, on_progress)
            summary.passes.append(outcome)
            summary.failures += outcome.failures
    elif on_start:  # an unchanged nightly rerun: no cluster, no work
        on_start(0, summary.skipped, None)
    finished = plan_record(plan, model, started, now(), checkpoint)
    checkpoint = history.archive(dataclasses.replace(checkpoint, finished=now()), finished)
    store.write_plan({**finished, "checkpoint": dataclasses.asdict(checkpoint)})
    history.keep(config.keep)
    store.write_manifest()
    summary.site = str(render(store.out))
    summary.seconds = time.monotonic() - clock
    return summary


def _last_plan(store: Store) -> dict | None:
    """The last run's plan, which names the checkpoint units/ holds; a damaged one is
    named, and this run starts a new checkpoint (its plan.json replaces the damaged one)."""
    try:
        return store.read_plan()
    except AtlasError as error:
        store.report(store.out / "plan.json", "is corrupt", f"{error}; a new checkpoint begins")
        return None


def with_previous(tasks: list[Task], history: History, checkpoint: Checkpoint) -> list[Task]:
    """The tasks, each carrying its units' images at the previous checkpoint, so that the
    worker scores how each unit changed since then."""
    previous = history.previous(checkpoint)
    if previous is None:
        return tasks
    archived = history.units(previous, tasks[0].recipe.hash if tasks else None)
    given = []
    for task in tasks:
        images = []
        for unit in task.units:
            # a cell, or a concept matched to none before it, has no earlier picture of itself
            followed = unit.learned is None or unit.learned.followed
            record = archived.get((unit.layer, unit.index)) if followed else None
            path = history.out / record.images[0] if record and record.status == "done" else None
            images.append(path.read_bytes() if path and webp_problem(path) is None else None)
        given.append(dataclasses.replace(task, previous=tuple(images), previous_from=previous.id))
    return given


def _store_outcome(store: Store, outcome, summary: RunSummary, checkpoint: str) -> None:
    """Write one finished task's units (or, for a task that failed for good, each of its
    units as failed), each naming the checkpoint that made it, and count them."""
    if outcome.error is not None:
        for unit in outcome.task.units:
            failed = unit_record(unit, outcome.task, status="failed", error=outcome.error)
            store.save_unit(dataclasses.replace(failed, checkpoint=checkpoint), [])
        summary.failed += len(outcome.task.units)
        summary.failures.append(f"{outcome.task.layer}: {outcome.error}")
        return
    for unit_outcome in outcome.result["units"]:
        record = dataclasses.replace(unit_outcome["record"], checkpoint=checkpoint)
        store.save_unit(record, unit_outcome.get("images", []), unit_outcome.get("files"))
        if record.status == "done":
            summary.done += 1
        else:
            summary.failed += 1
            summary.failures.append(f"{record.id}: {record.error}")
