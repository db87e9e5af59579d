"""Which source loads a model spec: each family of specs registers one loader, in the manner of
torchvision's `register_model` / `list_models`. Sources are asked in rank order: the bundled
names, torchvision's names, the prefixed zoos (`timm:`, `hf:`), then `package.module:factory`
and files; `atlas models` lists them in that order."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

from atlas.errors import AtlasError, did_you_mean
from atlas.models.loaded import LoadedModel

Loader = Callable[[str, str | None], LoadedModel]


@dataclass(frozen=True)
class ModelSource:
    """One family of specs: whether it takes a spec, how it loads one (spec, weights), the
    lines `atlas models` prints for it, and the names it offers for `did you mean`."""

    name: str
    accepts: Callable[[str], bool]
    load: Loader
    describe: Callable[[], list[str]]
    names: Callable[[], list[str]] = list
    rank: int = 50  # lower is asked first


_SOURCES: dict[str, ModelSource] = {}


def register_source(
    name: str,
    *,
    accepts: Callable[[str], bool],
    describe: Callable[[], list[str]],
    names: Callable[[], list[str]] = list,
    rank: int = 50,
) -> Callable[[Loader], Loader]:
    """Decorates a loader `(spec, weights) -> LoadedModel` as the source `name`."""

    def register(load: Loader) -> Loader:
        if name in _SOURCES:
            raise ValueError(f"model source {name!r} is registered twice")
        _SOURCES[name] = ModelSource(name, accepts, load, describe, names, rank)
        return load

    return register


def prefixed(prefix: str) -> Callable[[str], bool]:
    """`accepts` for a source whose specs start with `prefix` (`timm:`)."""
    return lambda spec: spec.startswith(prefix)


def optional(package: str, extra: str, what: str):
    """`package` imported, or an AtlasError saying how to install it: the zoos atlas reads
    beside torchvision are optional extras."""
    if importlib.util.find_spec(package) is None:
        raise AtlasError(f"{what} need {package}: pip install 'atlas[{extra}]' (or {package})")
    return importlib.import_module(package)


def installed(package: str, extra: str) -> str:
    """`timm 1.0.31`, or how to install it, for `atlas models`."""
    if importlib.util.find_spec(package) is None:
        return f"not installed: pip install 'atlas[{extra}]'"
    return f"{package} {version(package)}"


def sources() -> list[ModelSource]:
    """The registered sources in the order they are asked."""
    return sorted(_SOURCES.values(), key=lambda source: (source.rank, source.name))


def load(spec: str, weights: str | None = None) -> LoadedModel:
    """Load a model by spec; bad specs and weights raise AtlasError with one clear sentence."""
    for source in sources():
        if source.accepts(spec):
            return source.load(spec, weights)
    names = [name for source in sources() for name in source.names()]
    raise AtlasError(
        f"unknown model {spec!r}{did_you_mean(spec, names)}; "
        "`atlas models` lists the built-in names and the other kinds of spec"
    )


def describe_sources() -> list[str]:
    """What `atlas models` prints: each source's lines, a table (more than one line) set apart
    by a blank line."""
    lines: list[str] = []
    previous: list[str] = []
    for source in sources():
        described = source.describe()
        if lines and max(len(described), len(previous)) > 1:
            lines.append("")
        lines += described
        previous = described
    return lines
