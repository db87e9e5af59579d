"""The one page writer, of `atlas render` and `atlas compare`: pages are data, each one
(path, template, context); the writer renders and writes those that changed, and what a
rerender keeps is derived from that list (the pages, the files they link, the assets), so a new
page kind is one entry and never a forgotten file to keep. Then the sweep deletes the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jinja2 import Environment

from atlas.errors import AtlasError
from atlas.files import atomic_write_bytes, remove_temporaries
from atlas.site.jinja import environment


@dataclass(frozen=True)
class Page:
    """One file a build writes. `unit` is the id of the unit it shows (named when the page
    fails to render); `links` are the unit files it points to, relative to the site root, which
    the sweep of stale files keeps."""

    path: str  # relative to the site root, "/"-separated
    template: str
    context: dict
    unit: str | None = None
    links: tuple[str, ...] = ()


def write_if_changed(path: Path, text: str) -> None:
    """Write a page only when it changed (a nightly rerender touches few files)."""
    data = text.encode()
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data, durable=False)


def write_pages(root: Path, pages: list[Page], *, sweep: bool = True) -> None:
    """The one page writer, of `atlas render` and `atlas compare`: copy the assets, write the
    pages that changed, then delete the pages and images under `root` that are neither a page,
    nor linked by one, nor an asset (see remove_stale). A page that fails to render stops the
    build with an AtlasError naming it and its unit, before anything is deleted."""
    env = environment()
    keep = {root / path for path in copy_static(root)}
    for page in pages:
        write_if_changed(root / page.path, _render_page(env, page))
        keep.add(root / page.path)
        keep.update(root / link for link in page.links)
    remove_stale(root, keep, sweep=sweep)


def _render_page(env: Environment, page: Page) -> str:
    try:
        return env.get_template(page.template).render(page.context)
    except Exception as error:  # a template error or a bad value in a record, of this page
        unit = f" (unit {page.unit})" if page.unit else ""
        raise AtlasError(
            f"page {page.path}{unit} failed: {type(error).__name__}: {error}"
        ) from error


def remove_stale(root: Path, keep: set[Path], sweep: bool = True) -> int:
    """Delete the pages and images under `root` not in `keep` (units pruned since, older
    animations and exemplar patches), then empty folders; any other file stays. With `sweep`
    (only for the folder's one writer), also the temporaries a killed render left. Returns how
    many files went."""
    removed = remove_temporaries(root, below=True) if sweep else 0
    for path in sorted(root.rglob("*"), reverse=True):  # children before their folders
        if path.is_file() and path.suffix in {".html", ".webp"} and path not in keep:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def copy_static(root: Path) -> list[str]:
    """Copy the assets (site/ of the repository) into root/static/; returns their paths
    relative to `root`."""
    copied = []
    for asset in resources.files("atlas.static").iterdir():
        if asset.is_file() and asset.name.endswith((".css", ".js")):
            write_if_changed(root / "static" / asset.name, asset.read_text())
            copied.append(f"static/{asset.name}")
    return copied
