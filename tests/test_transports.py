"""What is particular to each transport: routing in the frameworks, lifespans, fallbacks.

The protocol itself is tested over every transport by the ``hub_server`` suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.server import serve as websockets_serve

import wshub
from wshub.session import FrameKind

from .events import open_stream
from .helpers import client, recv_json, wait_until


@contextlib.asynccontextmanager
async def uvicorn_serving(app: Any, **options: Any) -> AsyncIterator[int]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **options)
    )
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done())
        assert server.started, task.result()
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


def quiet_hub(implementation: str) -> wshub.Hub:
    config = wshub.HubConfig(log_connection_events=False)
    return wshub.Hub(config, implementation=implementation)  # type: ignore[arg-type]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            status: int = answer.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


async def test_a_starlette_route_at_the_dashboards_path_serves_the_hub(
    implementation: str,
) -> None:
    hub = quiet_hub(implementation)
    hub_app = wshub.asgi_app(hub)
    app = Starlette(routes=[WebSocketRoute("/api/ws", hub_app), Route("/api/events", hub_app)])
    async with hub, uvicorn_serving(app, lifespan="off") as port:
        url = f"ws://127.0.0.1:{port}/api/ws?topics=a"
        async with (
            client(url) as (ws, hello),
            open_stream(f"http://127.0.0.1:{port}/api/events?topics=a") as stream,
        ):
            assert hello["data"]["topics"] == ["a"]
            assert hub.broadcast_to_subscribers("event", 1, "a") == 2
            assert (await recv_json(ws))["data"] == 1
            assert (await stream.message())[1]["data"] == 1


async def test_run_by_uvicorn_alone_the_lifespan_runs_the_hub_and_http_gets_404(
    implementation: str,
) -> None:
    hub = quiet_hub(implementation)
    app = wshub.asgi_app(hub, path="/api/ws")
    async with uvicorn_serving(app, lifespan="on") as port:
        assert hub.running
        status = await asyncio.to_thread(http_status, f"http://127.0.0.1:{port}/api/ws")
        assert status == 404
        async with client(f"ws://127.0.0.1:{port}/api/ws"):
            assert hub.client_count == 1
    assert not hub.running


async def test_a_plain_websockets_connection_gets_text_messages(implementation: str) -> None:
    """Without server_options (so without the hub's connection class) the handler still
    serves, sending each message with connection.send."""
    hub = quiet_hub(implementation)
    async with hub, websockets_serve(hub.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with client(f"ws://127.0.0.1:{port}/") as (ws, hello):
            session = hub.session(hello["client_id"])
            assert session is not None
            assert session.transport.frame_kind is FrameKind.TEXT_MESSAGES
            for number in range(3):
                hub.broadcast_to_all("event", number)
            assert [(await recv_json(ws))["data"] for _ in range(3)] == [0, 1, 2]
