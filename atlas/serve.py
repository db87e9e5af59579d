"""`atlas serve`: a preview of OUT/site/ over http on 127.0.0.1 (the site needs no server;
this only shows it as a static host would).

It serves regular files inside the site and nothing else: no folder listings, no symbolic
link that leads out of the site, and headers that hold the pages to what they need (their own
scripts, styles and images; nothing from the network)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from atlas.errors import AtlasError

# The pages load only their own files; their inline `style="--value: ..."` attributes set the
# bars' lengths, so style attributes (not <style> elements) are allowed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
TEXT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
TEXT_TYPES |= {".json": "application/json", ".svg": "image/svg+xml", ".txt": "text/plain"}


class SiteHandler(SimpleHTTPRequestHandler):
    """GET and HEAD of the site's regular files, with a charset on text and safe headers."""

    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        **{suffix: f"{kind}; charset=utf-8" for suffix, kind in TEXT_TYPES.items()},
        ".webp": "image/webp",
    }

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        pass

    def send_head(self):
        """The file the URL names, when it is a regular file inside the site (a folder with
        an index.html serves that); 404 for anything else, listings included."""
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            if not self.path.split("?", 1)[0].split("#", 1)[0].endswith("/"):
                return super().send_head()  # the stdlib's redirect to "folder/"
            path = path / "index.html"
        if not self._inside_site(path):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        return super().send_head()

    def _inside_site(self, path: Path) -> bool:
        root = os.path.realpath(self.directory)
        real = os.path.realpath(path)
        return os.path.commonpath([root, real]) == root and Path(real).is_file()

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "File not found")
        return None

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache")  # a preview: show the newest render
        super().end_headers()


class PreviewServer(ThreadingHTTPServer):
    """Quiet about browsers that drop a connection mid-file (a page left before its images
    arrived): that is no error of the preview's."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def make_server(out: str | Path, port: int) -> ThreadingHTTPServer:
    site = Path(out) / "site"
    if not (site / "index.html").is_file():
        raise AtlasError(f"{site} has no index.html: run `atlas render {out}` first")
    handler = partial(SiteHandler, directory=str(site))
    try:
        return PreviewServer(("127.0.0.1", port), handler)
    except OSError as error:
        raise AtlasError(f"cannot serve on 127.0.0.1:{port}: {error.strerror}") from None


def serve(out: str | Path, port: int, on_ready: Callable[[str], None]) -> None:
    server = make_server(out, port)
    on_ready(f"http://127.0.0.1:{server.server_address[1]}/index.html")
    with server, contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
