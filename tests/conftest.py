"""Fixtures shared by the tests; the tiny models live in tinymodels.py."""

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator

import pytest
from tinymodels import tiny_model

from atlas.models import LoadedModel


@pytest.fixture
def tiny() -> LoadedModel:
    return tiny_model()


@pytest.fixture
def importable(tmp_path, monkeypatch) -> Iterator[Callable[[str], str]]:
    """Writes Python source as a fresh importable module (factories for model specs) and gives
    its name; the modules are forgotten afterwards."""
    names = []

    def write(source: str) -> str:
        name = f"atlas_test_module_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    monkeypatch.syspath_prepend(str(tmp_path))
    yield write
    for name in names:
        sys.modules.pop(name, None)


# what `make test-fast` leaves out: real weights, torchvision builds, processes, the browser
SLOW_FILES = {
    "test_cli.py",
    "test_examples.py",
    "test_execute.py",
    "test_families.py",
    "test_gpu_script.py",
    "test_boundaries.py",
    "test_integration.py",
    "test_models.py",
    "test_packaging.py",
    "test_site_browser.py",
    "test_slurm.py",
    "test_trust_lite0.py",
    "test_tvmodels.py",
    "test_zoos.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
