"""`atlas serve`: a preview of OUT/site/ over http on 127.0.0.1 (the site needs no server;
this only shows it as a static host would)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from atlas.errors import AtlasError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        pass


def make_server(out: str | Path, port: int) -> ThreadingHTTPServer:
    site = Path(out) / "site"
    if not (site / "index.html").is_file():
        raise AtlasError(f"{site} has no index.html: run `atlas render {out}` first")
    handler = partial(_QuietHandler, directory=str(site))
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as error:
        raise AtlasError(f"cannot serve on 127.0.0.1:{port}: {error.strerror}") from None


def serve(out: str | Path, port: int, on_ready: Callable[[str], None]) -> None:
    server = make_server(out, port)
    on_ready(f"http://127.0.0.1:{server.server_address[1]}/index.html")
    with server, contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
