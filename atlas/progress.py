"""Progress of an atlas run: a live line on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import click

LOG_EVERY_SECONDS = 10.0


def format_duration(seconds: float | None) -> str:
    """'4m07s', '2h05m', or '?' for an unknown duration."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class Progress:
    """Where a stage of a run stands: units optimized, or images of the exemplar pass."""

    done: int
    failed: int
    total: int
    elapsed: float  # seconds since the stage started
    what: str = "units"


class RunProgress:
    """Done/total, rate, ETA and failures of the current stage (units, then exemplar images),
    and what the cluster's batch jobs are doing; redraws one line on a terminal and logs a
    line every LOG_EVERY_SECONDS (the jobs' line when it changes) when stderr is a file or a
    pipe. The jobs' line comes from another thread."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.last_log = 0.0
        self.drawn = False
        self.what = "units"
        self.line = ""  # the stage's last line, redrawn with the jobs' line
        self.jobs = ""
        self.lock = threading.Lock()

    def start(self, todo: int, skipped: int, dashboard: str | None) -> None:
        with self.lock:  # the learning step's images (atlas.learning) may have drawn a line;
            self._end_line()  # the jobs' state stays, to be drawn with the units' line
        message = f"{todo} units to do, {skipped} already stored"
        if dashboard:
            message += f"; Dask dashboard: {dashboard}"
        click.echo(message, file=self.stream)

    def update(self, progress: Progress) -> None:
        with self.lock:
            if progress.what != self.what:  # a new stage: keep the last line of the one before
                self._end_line()
                self.what, self.last_log = progress.what, 0.0
            finished, total, what = progress.done + progress.failed, progress.total, progress.what
            rate = finished / progress.elapsed if progress.elapsed > 0 else 0.0
            eta = (total - finished) / rate if rate > 0 else 0.0
            line = (
                f"{finished}/{total} {what}  {rate:.2f} {what}/s  ETA {format_duration(eta)}  "
                f"{progress.failed} failed"
            )
            if self.live:
                filled = int(30 * finished / max(total, 1))
                self.line = f"[{'#' * filled}{'.' * (30 - filled)}] {line}"
                self._draw()
            elif time.monotonic() - self.last_log >= LOG_EVERY_SECONDS or finished == total:
                click.echo(line, file=self.stream)
                self.last_log = time.monotonic()

    def cluster(self, jobs: str) -> None:
        """What the worker jobs are doing ('2 of 4 worker jobs running, 2 pending in
        partition gpu'): on a terminal after the progress line, elsewhere a line of its own."""
        with self.lock:
            self.jobs = jobs
            if self.live:
                self._draw()
            else:
                click.echo(jobs, file=self.stream)

    def _draw(self) -> None:
        parts = [part for part in (self.line, self.jobs) if part]
        self.stream.write(f"\r{'; '.join(parts)}\033[K")
        self.stream.flush()
        self.drawn = True

    def _end_line(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        self.line = ""

    def finish(self) -> None:
        with self.lock:
            self._end_line()
            self.jobs = ""
