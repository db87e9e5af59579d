"""Packages whose names are imported on first use: `atlas.optim` (so that its recipes, and the
CLI's option parsing, do not pay for importing torch) and `atlas.site` (so that the pages'
data loads without Jinja2 or Pillow)."""

from collections.abc import Callable
from importlib import import_module


def lazy_names(package: str, homes: dict[str, list[str]]) -> tuple[Callable, list[str]]:
    """A module `__getattr__` that imports each name of `homes` (module -> names) from its
    module of `package` when first asked for, and the package's `__all__`."""
    where = {name: module for module, names in homes.items() for name in names}

    def attribute(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{where[name]}"), name)

    return attribute, sorted(where)
