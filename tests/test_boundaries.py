"""Which module may import which: the engine knows no Dask, HTML or CLI; the store, the site,
recipes and the CLI's start never load torch. Each check imports, in a fresh interpreter (so
that earlier imports cannot hide one), the module and, for a package, every module in it: a
package that loads its modules lazily would otherwise pass whatever they import."""

import pkgutil
import subprocess
import sys
from importlib import import_module

import pytest

ENGINE = ("dask", "distributed", "jinja2", "click")
RULES = [
    ("atlas.optim", ENGINE),  # every module of the engine
    ("atlas.layers", ENGINE),
    ("atlas.layout", ENGINE),
    ("atlas.mainpath", ENGINE),
    ("atlas.activations", ENGINE),
    ("atlas.analysis", ENGINE),  # worker side
    ("atlas.optimize", ("distributed", "jinja2", "click")),  # what a worker runs
    ("atlas.store", ("torch",)),
    ("atlas.site", ("torch",)),  # every module of the site
    ("atlas.site.units", ("torch", "jinja2", "PIL")),  # the pages' data, without templates
    ("atlas.site.timeline", ("torch", "jinja2", "PIL")),
    ("atlas.record", ("torch", "dask")),  # read by the store, the site and compare
    ("atlas.history", ("torch", "dask")),  # checkpoints: files only
    ("atlas.history_timeline", ("torch", "dask")),
    ("atlas.change", ("torch", "dask")),  # the score; torch only inside the measuring
    ("atlas.optim.recipes", ("torch",)),  # recipes and the CLI's options start fast
    ("atlas.cli", ("torch", "dask", "jinja2")),
]


def modules_of(name: str) -> list[str]:
    """The module, and every module below it when it is a package."""
    module = import_module(name)
    found = [name]
    if hasattr(module, "__path__"):
        found += [info.name for info in pkgutil.walk_packages(module.__path__, f"{name}.")]
    return found


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [(module, forbidden) for name, forbidden in RULES for module in modules_of(name)],
)
def test_module_does_not_import(module, forbidden):
    code = (
        f"import sys, {module}; "
        f"loaded = [name for name in {forbidden!r} if name in sys.modules]; "
        "assert not loaded, loaded"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr.splitlines()[-1:]


def test_every_engine_module_is_checked():
    """The check covers the engine's modules by walking the package, not by a list to keep."""
    checked = modules_of("atlas.optim")
    assert {"atlas.optim.loop", "atlas.optim.objectives", "atlas.optim.fold"} <= set(checked)
