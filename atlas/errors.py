"""The one exception type that the CLI turns into a one-line message and exit code 2."""

import difflib
from collections.abc import Iterable


class AtlasError(Exception):
    """Bad input from the user: the message is one sentence that says what to do."""


def did_you_mean(name: str, choices: Iterable[str], limit: int = 5) -> str:
    """A ' (did you mean: a, b?)' suffix naming the closest choices, or '' when none is close."""
    choices = list(choices)
    # a name cut short ('vit_smal') means the names it begins, before any that merely look alike
    close = sorted(c for c in choices if c.lower().startswith(name.lower()))[:limit]
    if len(close) < limit:
        close += difflib.get_close_matches(name, choices, n=limit - len(close), cutoff=0.5)
    if not close:
        close = [c for c in choices if name.lower() in c.lower()][:limit]
    close = list(dict.fromkeys(close))
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def describe(error: BaseException) -> str:
    """`KeyError: 'fc'`: an exception's type and the first line of its message, for messages
    that name a failure in user code or a library without its traceback."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
