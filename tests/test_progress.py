"""The progress display of `atlas run`: units, then the images of the exemplar pass."""

import io

from atlas.progress import Progress, RunProgress, format_duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_stage_with_its_own_counts():
    log = io.StringIO()
    progress = RunProgress(log)
    progress.start(4, 2, None)
    progress.update(Progress(4, 0, 4, 2.0))
    progress.update(Progress(16, 0, 64, 4.0, "images"))
    progress.update(Progress(60, 4, 64, 16.0, "images"))
    progress.finish()
    assert log.getvalue().splitlines() == [
        "4 units to do, 2 already stored",
        "4/4 units  2.00 units/s  ETA 0m00s  0 failed",
        "16/64 images  4.00 images/s  ETA 0m12s  0 failed",
        "64/64 images  4.00 images/s  ETA 0m00s  4 failed",
    ]


def test_a_terminal_keeps_the_last_line_of_each_stage():
    screen = Terminal()
    progress = RunProgress(screen)
    progress.update(Progress(1, 0, 2, 1.0))
    progress.update(Progress(2, 0, 2, 2.0))
    progress.update(Progress(8, 0, 8, 1.0, "images"))
    progress.finish()
    lines = [line.rsplit("\r", 1)[-1] for line in screen.getvalue().split("\n")]
    assert "2/2 units" in lines[0] and "8/8 images" in lines[1] and lines[2] == ""


def test_durations():
    assert [format_duration(s) for s in (None, 7, 247, 7500)] == ["?", "0m07s", "4m07s", "2h05m"]
