"""The static atlas: OUT/manifest.json and the unit images -> OUT/site/, and the page writer
`atlas compare` shares. Everything is relative links to files (no fetch, no network), so the
site works from file:// and from any static host. No module here imports torch.

    build.py     `atlas render`: the lock, the manifest, the pages, the writer
    pages.py     the pages as data: (path, template, context) for every page of an atlas
    units.py     a unit as its pages show it: links to its inputs, outputs and classes, trust
    timeline.py  the checkpoints as the pages show them: timeline, filmstrips, change plot
    linking.py   a unit's files linked from OUT into the site, thumbnails
    writer.py    the one page writer and the sweep of stale files
    jinja.py     the Jinja2 environment and filters

Names are imported on first use, so that atlas.site.units (the pages' data) loads without
Jinja2 or Pillow.
"""

from atlas.lazy import lazy_names

_HOMES = {
    "build": ["load_manifest", "render"],
    "pages": ["site_info", "site_pages"],
    "linking": ["link_or_copy"],
    "writer": ["Page", "write_pages"],
}
__getattr__, __all__ = lazy_names("atlas.site", _HOMES)
