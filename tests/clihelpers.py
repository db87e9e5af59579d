"""Helpers for tests that drive the `atlas` command in-process through click's CliRunner."""

from click.testing import CliRunner, Result


def make_runner() -> CliRunner:
    """Separate stdout and stderr: the default from click 8.2, `mix_stderr=False` before."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args) -> Result:
    """`atlas ARGS...` in-process; whatever its exit code, never a traceback."""
    from atlas.cli import cli

    result = make_runner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output, result.output
    return result


def assert_bad_input(result: Result, *fragments: str) -> str:
    """Exit code 2, one `error:` line on stderr holding every fragment, no traceback."""
    details = f"exit {result.exit_code}; stdout {result.stdout!r}; stderr {result.stderr!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}; {details}"
    )
    assert result.exit_code == 2, details
    assert "Traceback" not in result.output, details
    lines = result.stderr.splitlines()
    assert len(lines) == 1, details
    assert lines[0].startswith("error: "), details
    for fragment in fragments:
        assert fragment in lines[0], details
    return lines[0]
