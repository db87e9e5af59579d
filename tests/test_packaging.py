"""Templates (templates/) and assets (site/) live at the top level but ship inside the package
as atlas.templates and atlas.static: a built wheel and the editable install both render from
any working directory, and site/ does not shadow the standard library's `site`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from synthetic import make_atlas

ROOT = Path(__file__).resolve().parent.parent
# Where each source folder lands in the wheel.
SHIPPED = {"atlas": "atlas", "templates": "atlas/templates", "site": "atlas/static"}
RENDER = """
import sys
from pathlib import Path
import atlas.site, atlas.static, atlas.templates
print(Path(atlas.templates.__file__).parent)
print(Path(atlas.static.__file__).parent)
atlas.site.render(sys.argv[1])
"""


def source_files() -> dict[str, Path]:
    """Every file the wheel must hold, by its path in the wheel."""
    files = {}
    for folder, target in SHIPPED.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files[f"{target}/{path.relative_to(ROOT / folder).as_posix()}"] = path
    return files


def render_elsewhere(out: Path, cwd: Path, pythonpath: Path | None = None) -> list[Path]:
    """Render `out` in a fresh interpreter started in `cwd`; returns the folders that the
    templates and the assets were loaded from."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(
        [sys.executable, "-c", RENDER, str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.splitlines()]


def check_site(out: Path) -> None:
    site = out / "site"
    for page in ("index.html", "conv2/index.html", "conv2/0.html", "search-index.js"):
        assert (site / page).is_file(), page
    for asset in ("atlas.css", "atlas.js"):
        assert (site / "static" / asset).read_bytes() == (ROOT / "site" / asset).read_bytes()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A non-editable wheel, built offline with the venv's setuptools from a copy of the
    sources (an in-tree build/ folder could carry files deleted since)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in SHIPPED:
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp)]
    subprocess.run([*pip, *build, str(source)], check=True)
    (built,) = tmp.glob("atlas-*.whl")
    return built


def test_the_wheel_holds_every_module_template_and_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(set(source_files()) - names)
    assert not missing, f"not in the wheel: {missing}"
    assert {"atlas/templates/unit.html", "atlas/static/atlas.css"} <= names
    assert not any(name.startswith(("templates/", "site/")) for name in names)


def test_an_installed_wheel_renders_from_anywhere(wheel, tmp_path):
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--disable-pip-version-check", "--target", str(target), str(wheel)],
        check=True,
    )
    make_atlas(tmp_path / "out", {"conv2": 3})
    (tmp_path / "elsewhere").mkdir()
    folders = render_elsewhere(tmp_path / "out", tmp_path / "elsewhere", pythonpath=target)
    assert folders == [target / "atlas/templates", target / "atlas/static"]
    check_site(tmp_path / "out")


def test_the_editable_install_renders_from_anywhere(tmp_path):
    """The project's venv installs atlas editable (Makefile): templates and assets come from
    the repository's top-level folders, whatever the working directory."""
    make_atlas(tmp_path / "out", {"conv2": 3})
    (tmp_path / "elsewhere").mkdir()
    folders = render_elsewhere(tmp_path / "out", tmp_path / "elsewhere")
    assert folders == [ROOT / "templates", ROOT / "site"]
    check_site(tmp_path / "out")


def test_site_does_not_shadow_the_standard_library():
    """Python imports `site` before the working directory is on sys.path."""
    code = "import site, sysconfig; print(site.__file__); print(sysconfig.get_path('stdlib'))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    module, stdlib = result.stdout.splitlines()
    assert Path(module).parent == Path(stdlib), module
