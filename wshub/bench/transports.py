"""Serving one hub over each transport the same way, for the benchmark and the tests.

``uvicorn`` (for ``asgi``) is imported only when that transport is asked for; it is in the
``test`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from websockets.asyncio.server import serve as websockets_serve

import wshub
from wshub.transports.events import EVENTS_PATH

__all__ = [
    "COMPRESSING_TRANSPORTS",
    "EVENTS_PATH",
    "EVENT_TRANSPORTS",
    "PATH",
    "TRANSPORTS",
    "serve_over",
]

PATH = "/api/ws"
TRANSPORTS = ("lean", "websockets", "aiohttp", "asgi")
# Those that negotiate the hub's permessage-deflate (compression="deflate"): aiohttp's and
# uvicorn's connections answer the handshake themselves.
COMPRESSING_TRANSPORTS = ("lean", "websockets")
# Those that serve the event stream at EVENTS_PATH beside the WebSocket endpoint.
EVENT_TRANSPORTS = ("lean", "aiohttp", "asgi")


@contextlib.asynccontextmanager
async def serve_over(
    transport: str, hub: wshub.Hub, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[Any, int]]:
    """Serve ``hub`` at ``ws://<host>:<port>/api/ws`` over ``transport``; yields the
    listening server (None for aiohttp, which keeps it private) and the port.

    The hub is started first and stopped before the server, as an application does, so
    that its clients get the ``disconnection`` message and 1001.
    """
    serving = {
        "lean": _lean,
        "websockets": _websockets,
        "aiohttp": _aiohttp,
        "asgi": _asgi,
    }[transport]
    async with serving(hub, host) as (server, port):
        yield server, port


@contextlib.asynccontextmanager
async def _lean(hub: wshub.Hub, host: str) -> AsyncIterator[tuple[Any, int]]:
    async with wshub.serve(hub, host, 0) as server:
        yield server, server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def _websockets(hub: wshub.Hub, host: str) -> AsyncIterator[tuple[Any, int]]:
    await hub.start()
    try:
        options = wshub.server_options(hub, path=PATH)
        async with websockets_serve(hub.handler, host, 0, **options) as server:
            try:
                yield server.server, server.sockets[0].getsockname()[1]
            finally:
                await hub.stop()
    finally:
        await hub.stop()


@contextlib.asynccontextmanager
async def _aiohttp(hub: wshub.Hub, host: str) -> AsyncIterator[tuple[Any, int]]:
    app = web.Application()
    app.router.add_get(PATH, wshub.aiohttp_handler(hub))
    app.router.add_get(EVENTS_PATH, wshub.aiohttp_events_handler(hub))
    await hub.start()
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0, backlog=4096)
        await site.start()
        try:
            yield None, runner.addresses[0][1]
        finally:
            await hub.stop()
    finally:
        await hub.stop()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _asgi(hub: wshub.Hub, host: str) -> AsyncIterator[tuple[Any, int]]:
    import uvicorn

    config = hub.config
    # Run by uvicorn directly (a Starlette route is tested on its own): the application then
    # answers other paths itself.
    server = uvicorn.Server(
        uvicorn.Config(
            wshub.asgi_app(hub, path=PATH),
            host=host,
            port=0,
            backlog=4096,
            lifespan="off",
            log_level="warning",
            ws_max_size=config.max_message_size,
            ws_per_message_deflate=False,
            # The hub decides whose X-Forwarded-For it believes (trusted_proxies); uvicorn's
            # own rewriting of the client address would trust 127.0.0.1 by default.
            proxy_headers=False,
            ws_ping_interval=config.ping_interval if config.enable_ping_pong else None,
            ws_ping_timeout=config.pong_timeout if config.enable_ping_pong else None,
            timeout_graceful_shutdown=max(1, round(config.write_timeout)),
        )
    )
    await hub.start()
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.005)
        listening = server.servers[0]
        try:
            yield listening, listening.sockets[0].getsockname()[1]
        finally:
            await hub.stop()
    finally:
        await hub.stop()
        server.should_exit = True
        await task
