"""The websockets side: the server options a hub needs, and the checks before a handshake."""

from __future__ import annotations

import contextlib
import inspect
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as websockets_serve
from websockets.http11 import Request, Response

from .hub import Hub

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
    origins: list[str | None] | None = None
    if config.allowed_origins is not None:
        # Browsers always send Origin; other clients may omit it and are let through.
        origins = [*config.allowed_origins, None]
    return {
        "compression": None,
        "max_size": config.max_message_size,
        "ping_interval": config.ping_interval if heartbeat else None,
        "ping_timeout": config.pong_timeout if heartbeat else None,
        "open_timeout": config.read_timeout,
        "close_timeout": config.write_timeout,
        "origins": origins,
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


@contextlib.asynccontextmanager
async def serve(
    hub: Hub,
    host: str | None,
    port: int | None,
    *,
    path: str = "/api/ws",
    ssl: Any = None,
    **kwargs: Any,
) -> AsyncIterator[Server]:
    """Serve ``hub`` on ``host:port`` at ``path`` for the duration of an ``async with`` block.

    Starts the hub when it is not running. Leaving the block stops listening and then stops
    the hub, so every client gets the ``disconnection`` message and a 1001 close.

    Args:
        hub: The hub whose clients connect here.
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (read it from ``server.sockets``).
        path: The WebSocket endpoint; other paths get HTTP 404.
        ssl: An ``ssl.SSLContext`` for ``wss://``.
        **kwargs: More options for ``websockets.asyncio.server.serve``; they override
            :func:`server_options`, except that a ``process_request`` runs after the hub's
            own checks.

    Yields:
        The websockets server.
    """
    await hub.start()
    options = server_options(hub, path=path)
    user_process_request = kwargs.pop("process_request", None)
    if user_process_request is not None:
        options["process_request"] = _hub_process_request(hub, path, user_process_request)
    options.update(kwargs)
    server = await websockets_serve(hub.handler, host, port, ssl=ssl, **options)
    try:
        yield server
    finally:
        server.close(close_connections=False)
        await hub.stop()
        await server.wait_closed()
