"""`atlas render`: OUT/manifest.json and the unit images -> OUT/site/. Renders of one OUT take
turns under a lock; a damaged manifest is rebuilt from the unit files, which are the truth.
This package never imports torch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from atlas.errors import AtlasError
from atlas.files import exclusive_lock
from atlas.site.pages import site_pages
from atlas.site.writer import write_pages
from atlas.store import Store, warn


def manifest_path(out: Path) -> Path:
    path = out / "manifest.json"
    if not path.is_file():
        raise AtlasError(f"{out} has no manifest.json: run `atlas run ... --out {out}` first")
    return path


def load_manifest(out: Path, warn: Callable[[str], None] = warn) -> dict:
    """OUT/manifest.json; a damaged one is rebuilt from plan.json and the unit JSONs (it only
    gathers them, so nothing is lost), with a warning naming it."""
    path = manifest_path(out)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("units", []), list):
        return manifest
    warn("manifest.json is corrupt; rebuilt from plan.json and the unit files")
    return Store(out, warn).write_manifest()


def render(out: str | Path, warn: Callable[[str], None] = warn) -> Path:
    """Render OUT/site/ from OUT/manifest.json; returns the path of index.html. Renders of one
    OUT take turns (`atlas render` may run beside the render that ends `atlas run`), so the
    last one to finish shows the newest manifest and none deletes what another is writing.
    Damaged files are reported through `warn` (a `warning:` line on stderr by default)."""
    out = Path(out)
    manifest_path(out)  # a clear error before a lock file is left in a folder that is no atlas
    with exclusive_lock(out / ".render.lock") as alone:
        return _render(out, load_manifest(out, warn), sweep=alone, warn=warn)


def _render(out: Path, manifest: dict, sweep: bool, warn: Callable[[str], None] = warn) -> Path:
    site = out / "site"
    write_pages(site, site_pages(out, site, manifest, warn), sweep=sweep)
    return site / "index.html"
