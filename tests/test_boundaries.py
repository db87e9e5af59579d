"""Which module may import which: the engine knows no Dask, HTML or CLI; the store, the site,
recipes and the CLI's start never load torch. Each check imports in a fresh interpreter, so
earlier imports cannot hide one."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("atlas.optim", ("dask", "distributed", "jinja2", "click")),
        ("atlas.layers", ("dask", "distributed", "jinja2", "click")),
        ("atlas.mainpath", ("dask", "distributed", "jinja2", "click")),
        ("atlas.store", ("torch",)),
        ("atlas.site", ("torch",)),
        ("atlas.site.units", ("torch", "jinja2", "PIL")),  # the pages' data, without templates
        ("atlas.record", ("torch", "dask")),  # read by the store, the site and compare
        ("atlas.history", ("torch", "dask")),  # checkpoints: files only
        ("atlas.site.timeline", ("torch", "jinja2", "PIL")),
        ("atlas.change", ("torch", "dask")),  # the score; torch only inside the measuring
        ("atlas.analysis", ("dask", "distributed", "jinja2", "click")),  # worker side
        ("atlas.optim.recipes", ("torch",)),  # recipes and the CLI's options start fast
        ("atlas.cli", ("torch", "dask", "jinja2")),
    ],
)
def test_module_does_not_import(module, forbidden):
    code = (
        f"import sys, {module}; "
        f"loaded = [name for name in {forbidden!r} if name in sys.modules]; "
        "assert not loaded, loaded"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr.splitlines()[-1:]
