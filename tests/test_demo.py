"""GET /api/ice-servers and the demo client's files: content types, caching, no way out of the folder."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signald import Server
from signald._static import CONTENT_TYPES, load_assets

from ._clients import http_request

TURN = {"urls": ["turn:turn.example.com:3478", "turns:turn.example.com:5349"], "username": "u", "credential": "c"}


async def test_ice_servers_default_to_none(server: Server) -> None:
    assert server.port
    status, headers, body = await http_request(server.port, "GET", "/api/ice-servers")
    assert (status, body) == (200, {"iceServers": []})
    assert headers["cache-control"] == "no-store"  # it may carry TURN credentials


async def test_ice_servers_in_rtc_peer_connection_format(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(ice={"servers": [{"urls": ["stun:stun.example.com:3478"]}, TURN]})
    status, headers, body = await http_request(
        server.port, "GET", "/api/ice-servers", headers=[("Origin", "https://app.example")]
    )
    assert status == 200
    # Exactly what `new RTCPeerConnection({iceServers})` takes: no null username on STUN.
    assert body == {"iceServers": [{"urls": ["stun:stun.example.com:3478"]}, TURN]}
    assert headers["access-control-allow-origin"] == "https://app.example"
    status, headers, body = await http_request(server.port, "POST", "/api/ice-servers", b"{}")
    assert (status, body["error"], headers["allow"]) == (405, "method-not-allowed", "GET, OPTIONS")


@pytest.mark.parametrize("path", ["/", "/index.html", "/demo.js"])
async def test_demo_is_off_by_default(server: Server, path: str) -> None:
    assert server.port
    status, _, body = await http_request(server.port, "GET", path)
    assert (status, body["error"]) == (404, "not-found")


@pytest.fixture
async def demo(server_factory: Callable[..., Any]) -> Server:
    return await server_factory(demo={"enabled": True})


async def test_page_and_every_file_it_references(demo: Server) -> None:
    assert demo.port
    status, headers, page = await http_request(demo.port, "GET", "/?room=standup")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.decode())
    assert sorted(referenced) == ["demo.css", "demo.js", "favicon.svg"]
    for name in referenced:
        status, headers, body = await http_request(demo.port, "GET", f"/{name}")
        assert status == 200, name
        assert headers["content-type"] == CONTENT_TYPES[Path(name).suffix]
        assert headers["content-length"] == str(len(body)) and body
        assert "content-security-policy" not in headers  # only documents need one


async def test_unchanged_files_revalidate_with_304(demo: Server) -> None:
    assert demo.port
    _, headers, body = await http_request(demo.port, "GET", "/demo.js")
    etag = headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    for tag in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        status, headers, again = await http_request(demo.port, "GET", "/demo.js", headers=[("If-None-Match", tag)])
        assert (status, again) == (304, b""), tag
        assert headers["etag"] == etag and headers["cache-control"] == "no-cache"
        assert "content-length" not in headers  # it would have to be the full body's length
    status, _, again = await http_request(demo.port, "GET", "/demo.js", headers=[("If-None-Match", '"stale"')])
    assert (status, again) == (200, body)


@pytest.mark.parametrize(
    "target",
    [
        "/../signald/_rest.py",
        "/%2e%2e/_rest.py",
        "/..%2f_rest.py",
        "/static/demo.js",
        "/_static.py",
        "/__init__.py",
        "//demo.js",
        "/demo.js/",
        "/DEMO.JS",
        "/demo.js%00",
        "/./demo.js",
        "/..",
    ],
)
async def test_nothing_but_the_listed_files(demo: Server, target: str) -> None:
    assert demo.port
    status, _, body = await http_request(demo.port, "GET", target)
    assert (status, body["error"]) == (404, "not-found")


async def test_files_are_read_only(demo: Server) -> None:
    assert demo.port
    status, headers, _ = await http_request(demo.port, "POST", "/", b"x")
    assert (status, headers["allow"]) == (405, "GET, OPTIONS")


def test_only_known_kinds_of_file_are_shipped(tmp_path: Path) -> None:
    shipped = load_assets()
    assert shipped["/"] is shipped["/index.html"]
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "notes.txt").write_text("not for the web")
    with pytest.raises(ValueError, match=r"notes\.txt: no content type"):
        load_assets(tmp_path)
