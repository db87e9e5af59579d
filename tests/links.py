"""A link checker for rendered sites (no browser): every href and src resolves to a file
inside the site, never a folder, never absolute, and every #fragment names an id there."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Links(HTMLParser):
    """Every href and src, the data-previous/data-next targets of unit pages, and every id."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src", "data-previous", "data-next") and value:
                self.links.append((tag, name, value))
            if name == "id" and value:
                self.ids.append(value)


def parse(path: Path) -> Links:
    parser = Links()
    parser.feed(path.read_text())
    parser.close()
    return parser


def check_links(site: Path) -> int:
    """Asserts every link of every page under `site` resolves; returns how many were checked."""
    site = site.resolve()
    problems, checked = [], 0
    for page in sorted(site.rglob("*.html")):
        where = page.relative_to(site)
        for tag, attribute, value in parse(page).links:
            link = urlsplit(value)
            if link.scheme in ("javascript", "data"):  # inline: nothing is fetched
                continue
            if link.scheme or link.netloc or value.startswith("/"):
                problems.append(f"{where}: absolute {tag} {attribute}={value!r}")
                continue
            target = page
            if link.path:
                target = (page.parent / unquote(link.path)).resolve()
                if site not in target.parents:
                    problems.append(f"{where}: {value!r} leaves the site")
                    continue
                if link.path.endswith("/") or target.is_dir():
                    problems.append(f"{where}: {value!r} is a folder, not index.html or a file")
                    continue
                if not target.is_file():
                    problems.append(f"{where}: {value!r} does not exist")
                    continue
            if link.fragment and link.fragment not in parse(target).ids:
                problems.append(f"{where}: {value!r}: no id {link.fragment!r} there")
            checked += 1
    assert not problems, "\n".join(problems)
    return checked
