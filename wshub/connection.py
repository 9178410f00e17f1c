"""Serving a hub: :func:`serve` on the lean server, and the options for a websockets server.

:func:`serve` runs :mod:`wshub.server`, which drives websockets' sans-I/O protocol without a
task per connection. :func:`server_options` and ``hub.handler`` remain for applications that
embed the hub in a websockets server of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from .hub import Hub
from .server import _start, allowed_origins

__all__ = ["serve", "server_options"]

ProcessRequest = Callable[
    [ServerConnection, Request], Response | Awaitable[Response | None] | None
]


def server_options(hub: Hub, *, path: str = "/api/ws") -> dict[str, Any]:
    """Keyword arguments for ``websockets.asyncio.server.serve`` that match ``hub.config``.

    Compression is off (a frame built once must be valid on every connection), frame size,
    keepalive, handshake and closing deadlines and allowed origins come from the config, and
    ``process_request`` answers 404 off ``path`` and 503 when the hub is full or stopping.
    """
    config = hub.config
    heartbeat = config.enable_ping_pong
    return {
        "compression": None,
        "max_size": config.max_message_size,
        "ping_interval": config.ping_interval if heartbeat else None,
        "ping_timeout": config.pong_timeout if heartbeat else None,
        "open_timeout": config.read_timeout,
        "close_timeout": config.write_timeout,
        "origins": allowed_origins(config),
        "process_request": _hub_process_request(hub, path),
    }


def _hub_process_request(
    hub: Hub, path: str, then: ProcessRequest | None = None
) -> Callable[[ServerConnection, Request], Awaitable[Response | None]]:
    async def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if urllib.parse.urlsplit(request.path).path != path:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if not hub.running:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Hub is not running\n")
        if hub.client_count >= hub.config.max_clients:
            hub._rejected += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Too many clients\n")
        if then is None:
            return None
        response = then(connection, request)
        if inspect.isawaitable(response):
            response = await response
        return response

    return process_request


# loop.create_server options that make sense here; websockets' own options (compression,
# ping_interval, process_request, ...) have no meaning on the lean server.
SERVE_OPTIONS = frozenset(
    {"backlog", "family", "reuse_port", "ssl_handshake_timeout", "ssl_shutdown_timeout"}
)


@contextlib.asynccontextmanager
async def serve(
    hub: Hub,
    host: str | None,
    port: int | None,
    *,
    path: str = "/api/ws",
    ssl: Any = None,
    dashboard: bool = False,
    **kwargs: Any,
) -> AsyncIterator[asyncio.Server]:
    """Serve ``hub`` on ``host:port`` at ``path`` for the duration of an ``async with`` block.

    Starts the hub when it is not running. Leaving the block stops listening, stops the hub
    (every client gets the ``disconnection`` message and a 1001 close), aborts handshakes
    still pending and waits until every connection has ended.

    The server is :mod:`wshub.server`: websockets' sans-I/O protocol under a lean asyncio
    protocol, with no task per connection. Every setting comes from ``hub.config``.

    Args:
        hub: The hub whose clients connect here.
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (read it from ``server.sockets``).
        path: The WebSocket endpoint; other paths get HTTP 404.
        ssl: An ``ssl.SSLContext`` for ``wss://``.
        dashboard: Also serve the browser dashboard over plain HTTP on the same port:
            ``GET /`` and the files it loads, read once from ``wshub/static/``; other
            paths still get 404. Off by default, so an embedding service exposes nothing
            it did not ask for.
        **kwargs: ``backlog`` (default 4096), ``family``, ``reuse_port``,
            ``ssl_handshake_timeout`` and ``ssl_shutdown_timeout``, passed to
            ``loop.create_server``.

    Yields:
        The listening ``asyncio.Server``.

    Raises:
        TypeError: Another keyword argument, such as an option of websockets' ``serve``:
            to use those, serve ``hub.handler`` with ``websockets.asyncio.server.serve`` and
            :func:`server_options`.
    """
    unknown = sorted(set(kwargs) - SERVE_OPTIONS)
    if unknown:
        raise TypeError(
            f"serve() got unsupported keyword arguments: {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(SERVE_OPTIONS))}. For websockets' own server options, serve "
            "hub.handler with websockets.asyncio.server.serve(**wshub.server_options(hub))."
        )
    kwargs.setdefault("backlog", 4096)
    await hub.start()
    server, endpoint = await _start(
        hub, host, port, path=path, ssl=ssl, dashboard=dashboard, **kwargs
    )
    try:
        yield server
    finally:
        server.close()
        try:
            await hub.stop()
        finally:
            await endpoint.aclose()
            await server.wait_closed()
