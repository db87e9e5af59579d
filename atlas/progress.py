"""Progress of an atlas run: a live line on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time

import click

LOG_EVERY_SECONDS = 10.0


def format_duration(seconds: float | None) -> str:
    """'4m07s', '2h05m', or '?' for an unknown duration."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class RunProgress:
    """Units done/total, rate, ETA and failures; redraws one line on a terminal and logs a
    line every LOG_EVERY_SECONDS when stderr is a file or a pipe."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.total = 0
        self.last_log = 0.0
        self.drawn = False

    def start(self, todo: int, skipped: int, dashboard: str | None) -> None:
        self.total = todo
        message = f"{todo} units to do, {skipped} already stored"
        if dashboard:
            message += f"; Dask dashboard: {dashboard}"
        click.echo(message, file=self.stream)

    def update(self, progress) -> None:
        finished = progress.done + progress.failed
        rate = finished / progress.elapsed if progress.elapsed > 0 else 0.0
        eta = (self.total - finished) / rate if rate > 0 else 0.0
        line = (
            f"{finished}/{self.total} units  {rate:.2f} units/s  ETA {format_duration(eta)}  "
            f"{progress.failed} failed"
        )
        if self.live:
            filled = int(30 * finished / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}\033[K")
            self.stream.flush()
            self.drawn = True
        elif time.monotonic() - self.last_log >= LOG_EVERY_SECONDS or finished == self.total:
            click.echo(line, file=self.stream)
            self.last_log = time.monotonic()

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
