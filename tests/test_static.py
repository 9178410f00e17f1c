"""The dashboard's files over plain HTTP on the public port, beside the WebSocket endpoint."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import pytest

from .helpers import TIMEOUT, client, recv_json
from .test_cli import wshub_serve

STATIC = pathlib.Path(__file__).resolve().parent.parent / "wshub" / "static"

FILES = [
    ("/", "index.html", "text/html; charset=utf-8"),
    ("/wshub.js", "wshub.js", "text/javascript; charset=utf-8"),
    ("/dashboard.js", "dashboard.js", "text/javascript; charset=utf-8"),
    ("/dashboard.css", "dashboard.css", "text/css; charset=utf-8"),
]


async def http_request(
    port: int, target: str, *, method: str = "GET", headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a fresh connection and read the answer to the end of the stream.

    Reading to EOF is the point: it fails (by timeout) if the server keeps the connection
    open after the response.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode()
        )
        async with asyncio.timeout(TIMEOUT):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, body


def port_of(served: Any) -> int:
    port: int = served.server.sockets[0].getsockname()[1]
    return port


@pytest.mark.parametrize(("target", "name", "content_type"), FILES)
async def test_dashboard_files_are_served_with_their_type_and_no_cache(
    lean_server: Any, target: str, name: str, content_type: str
) -> None:
    async with lean_server(serve_options={"dashboard": True}) as served:
        status, headers, body = await http_request(port_of(served), target)
    assert status == 200
    assert headers["content-type"] == content_type
    assert headers["cache-control"] == "no-cache"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert body == (STATIC / name).read_bytes()


async def test_page_with_a_query_string_is_still_the_page(lean_server: Any) -> None:
    # The dashboard keeps its filter in the URL (/?test=eth_call).
    async with lean_server(serve_options={"dashboard": True}) as served:
        status, headers, body = await http_request(port_of(served), "/?test=eth_call")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert body == (STATIC / "index.html").read_bytes()
    assert "default-src 'self'" in headers["content-security-policy"]


async def test_the_page_points_at_the_servers_websocket_path(lean_server: Any) -> None:
    async with lean_server(serve_options={"dashboard": True, "path": "/events"}) as served:
        status, _, body = await http_request(port_of(served), "/")
    assert status == 200
    assert b'<meta name="wshub-endpoint" content="/events">' in body
    assert b"/api/ws" not in body


@pytest.mark.parametrize(
    "target",
    [
        "/index.html",
        "/static/index.html",
        "/wshub/static/dashboard.js",
        "/../pyproject.toml",
        "/favicon.ico",
    ],
)
async def test_other_paths_are_404(lean_server: Any, target: str) -> None:
    async with lean_server(serve_options={"dashboard": True}) as served:
        status, headers, _ = await http_request(port_of(served), target)
    assert status == 404
    assert headers["content-type"] == "text/plain; charset=utf-8"


async def test_a_file_is_only_answered_to_get(lean_server: Any) -> None:
    async with lean_server(serve_options={"dashboard": True}) as served:
        status, headers, _ = await http_request(port_of(served), "/", method="HEAD")
    assert status == 405
    assert headers["allow"] == "GET"


async def test_a_websocket_upgrade_of_a_file_path_is_404(lean_server: Any) -> None:
    async with lean_server(serve_options={"dashboard": True}) as served:
        upgrade = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        )
        status, _, _ = await http_request(port_of(served), "/", headers=upgrade)
    assert status == 404


async def test_disabled_by_default(lean_server: Any) -> None:
    async with lean_server() as served:
        for target, _, _ in FILES:
            status, _, _ = await http_request(port_of(served), target)
            assert status == 404, target


async def test_websocket_still_works_on_the_same_port(lean_server: Any) -> None:
    async with (
        lean_server(serve_options={"dashboard": True}) as served,
        client(served.url) as (ws, hello),
    ):
        assert hello["data"]["topics"] == ["*"]
        status, _, _ = await http_request(port_of(served), "/")
        assert status == 200
        assert served.hub.broadcast_to_subscribers("run_progress", {"p": 1}, ["x"]) == 1
        assert (await recv_json(ws))["type"] == "run_progress"
        # A plain request is not a client.
        assert served.hub.client_count == 1
        assert served.hub.stats()["rejected_connections"] == 0


async def test_wshub_serve_serves_the_dashboard() -> None:
    async with wshub_serve() as (_, port):
        status, headers, body = await http_request(port, "/")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert body == (STATIC / "index.html").read_bytes()
