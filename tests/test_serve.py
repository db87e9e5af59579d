"""`atlas serve` over real HTTP on 127.0.0.1: the site's regular files with safe headers, and
nothing else (no listings, no symbolic link out of the site, no traversal)."""

import http.client
import threading

import pytest
from synthetic import make_atlas

from atlas.serve import make_server
from atlas.site import render


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A rendered synthetic atlas, served for the module: (OUT, port)."""
    out = tmp_path_factory.mktemp("served") / "atlas"
    make_atlas(out, {"conv2": 3})
    render(out)
    site = out / "site"
    (tmp_path_factory.getbasetemp() / "secret.txt").write_text("not for the web")
    (site / "leak.txt").symlink_to(tmp_path_factory.getbasetemp() / "secret.txt")
    (site / "outside").symlink_to(tmp_path_factory.getbasetemp(), target_is_directory=True)
    (site / "inside.html").symlink_to(site / "index.html")
    (site / "bare").mkdir()
    (site / "bare" / "note.txt").write_text("a folder without an index")
    server = make_server(out, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield out, server.server_address[1]
    server.shutdown()
    server.server_close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/index.html", "text/html; charset=utf-8"),
        ("/", "text/html; charset=utf-8"),
        ("/conv2/index.html", "text/html; charset=utf-8"),
        ("/static/atlas.css", "text/css; charset=utf-8"),
        ("/static/atlas.js", "text/javascript; charset=utf-8"),
        ("/conv2/img/0.webp", "image/webp"),
        ("/inside.html", "text/html; charset=utf-8"),  # a link that stays in the site
    ],
)
def test_the_site_s_files_come_with_their_type_and_safe_headers(served, path, kind):
    status, headers, body = get(served[1], path)
    assert status == 200 and body
    assert headers["content-type"] == kind
    assert headers["x-content-type-options"] == "nosniff"
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "http" not in policy  # nothing from the network


@pytest.mark.parametrize(
    "path",
    [
        "/leak.txt",  # a symbolic link to a file outside the site
        "/outside/secret.txt",  # a file through a linked folder outside the site
        "/outside/",  # its listing
        "/bare/",  # a folder without an index: no listing
        "/conv2/img/",
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/conv2/../../secret.txt",
        "/nothing.html",
    ],
)
def test_anything_but_a_regular_file_inside_the_site_is_not_found(served, path):
    status, headers, body = get(served[1], path)
    assert status == 404, body[:200]
    assert b"not for the web" not in body and b"note.txt" not in body
    assert headers["x-content-type-options"] == "nosniff"


def test_a_folder_without_its_slash_is_redirected_as_a_static_host_does(served):
    status, headers, _ = get(served[1], "/conv2")
    assert status == 301 and headers["location"] == "/conv2/"
