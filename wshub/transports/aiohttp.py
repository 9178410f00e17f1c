"""The aiohttp transport: the hub's endpoint as a route of an aiohttp application.

::

    app = web.Application()
    app.router.add_get("/api/ws", wshub.aiohttp_handler(hub))

aiohttp's ``WebSocketResponse`` does the handshake, reads and assembles messages, answers
pings and runs the keepalive (``heartbeat`` is ``ping_interval``; aiohttp closes a client that
has not answered within half of it). No compression is negotiated here (aiohttp's own would
compress per connection, and answers no ``server_no_context_takeover`` unless asked), so the
core writes the plain frames it built once straight to the request's transport, as on the
lean server: one write per client per loop iteration. aiohttp writes its own control frames
whole, so they never interleave with the core's. What it costs beside the lean server: a task
per connection and aiohttp's reader, measured in the README's benchmark table.

The hub's Server-Sent Events stream (docs/protocol.md) is a route too::

    app.router.add_get("/api/events", wshub.aiohttp_events_handler(hub))

There aiohttp writes the response (chunked), so each client's records go out through one
``await response.write()`` per flush, from a :class:`~.messages.MessageSender`.

The hub must be started (and stopped) by the application, for example in ``on_startup`` and
``on_cleanup``, or by running it around ``web.AppRunner``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from ..limits import set_send_buffer
from ..session import (
    ClientSession,
    FrameKind,
    HandshakeRequest,
    Refusal,
    SessionHost,
    admission_of,
    format_address,
)
from .events import SentStream, close_record, stream_headers
from .messages import HIGH_WATER

__all__ = ["aiohttp_events_handler", "aiohttp_handler"]

# How often a stream's handler looks whether its client is still there: aiohttp does not
# cancel a handler whose client left, and a stream receives nothing that would tell it.
_STREAM_CHECK = 1.0

_INTERNAL_ERROR = 1011
_MESSAGE_TOO_BIG = 1009


def _handshake_request(request: web.Request) -> HandshakeRequest:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    # raw_path keeps the query string (request.path does not).
    return HandshakeRequest.from_target(
        request.raw_path, request.headers.items(), format_address(peer)
    )


def _refused(refusal: Refusal) -> web.Response:
    """The HTTP answer to a request the hub does not admit."""
    return web.Response(
        status=refusal.status, text=f"{refusal.reason}\n", headers=dict(refusal.headers)
    )


class _Client:
    """The :class:`~wshub.session.ClientTransport` of one aiohttp WebSocket."""

    frame_kind = FrameKind.WEBSOCKET_FRAMES

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        writer: Any,
        close_timeout: float,
    ) -> None:
        self.ws = ws
        self._close_timeout = close_timeout
        self.closed_by_hub: asyncio.Task[Any] | None = None
        self._transport = transport
        self._writer = writer
        self.session: ClientSession | None = None
        self._paused = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def write(self, data: bytes) -> None:
        # aiohttp may have begun a close of its own (a close frame from the client, a
        # heartbeat timeout): after its close frame nothing else may go out.
        if self.ws.closed or self._closing:
            self._tell_closing()
            raise ConnectionError("the connection is closing")
        transport = self._transport
        transport.write(data)
        if not self._paused and transport.get_write_buffer_size() > HIGH_WATER:
            self._paused = True
            if self.session is not None:
                self.session.pause_writing()
            self._spawn(self._drain())

    async def _drain(self) -> None:
        try:
            await self._writer.drain()  # returns once the transport resumed writing
        except Exception:
            return  # the connection is gone; the receive loop reports it
        self._paused = False
        if self.session is not None and not self.ws.closed and not self._closing:
            self.session.resume_writing()

    def _tell_closing(self) -> None:
        if not self._closing:
            self._closing = True
            if self.session is not None:
                self.session.closing()

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._tell_closing()
        self.closed_by_hub = self._spawn(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        # aiohttp waits for the client's close frame within its timeout, but writing its own
        # close frame waits for the socket to drain, without a bound: bound it here.
        try:
            async with asyncio.timeout(self._close_timeout):
                await self.ws.close(code=code, message=reason.encode())
        except TimeoutError:
            self._transport.abort()

    def abort(self) -> None:
        self._transport.abort()

    def buffered_bytes(self) -> int:
        transport = self._transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def aiohttp_handler(hub: SessionHost) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp request handler that serves hub clients, for ``router.add_get``.

    It applies the hub's admission before the handshake (HTTP 401 without the credentials
    it requires, 403 for another browser origin, 503 when the hub is full or stopping) and
    takes sizes, keepalive and deadlines from ``hub.config``.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        admission = await admission_of(hub, _handshake_request(request))
        if isinstance(admission, Refusal):
            return _refused(admission)
        config = hub.config
        ws = web.WebSocketResponse(
            compress=False,  # one frame built once must be valid on every connection
            max_msg_size=config.max_message_size,
            heartbeat=config.ping_interval if config.enable_ping_pong else None,
            timeout=config.write_timeout,
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None:  # the client left during the handshake
            return ws
        transport.set_write_buffer_limits(HIGH_WATER)
        set_send_buffer(transport, config.socket_send_buffer)
        client = _Client(ws, transport, request.writer, config.write_timeout)
        opened = hub.open_session(client, admission)
        if isinstance(opened, Refusal):
            await ws.close(code=opened.close_code, message=opened.reason.encode())
            return ws
        client.session = opened
        idle_limit = None if config.enable_ping_pong else config.read_timeout
        try:
            await _receive(ws, client, opened, idle_limit)
            if client.closed_by_hub is not None:
                # Returning would make aiohttp close with 1000 over the hub's own code.
                await asyncio.shield(client.closed_by_hub)
        finally:
            client._tell_closing()
            opened.closed(ws.close_code, None)
        return ws

    return handler


async def _receive(
    ws: web.WebSocketResponse,
    client: _Client,
    session: ClientSession,
    idle_limit: float | None,
) -> None:
    while True:
        try:
            async with asyncio.timeout(idle_limit):
                message = await ws.receive()
        except TimeoutError:  # silent for read_timeout, without protocol pings
            client.close(_INTERNAL_ERROR, "read timeout")
            return
        kind = message.type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            session.received(message.data)
        elif kind is WSMsgType.ERROR:
            # Too big, bad UTF-8 or a broken frame: aiohttp has closed with the right code.
            return
        else:  # CLOSE, CLOSING, CLOSED
            return


def aiohttp_events_handler(
    hub: SessionHost,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp request handler that serves the hub's event stream, for ``router.add_get``.

    The same admission, query (``?topics=``, ``?since=`` or ``Last-Event-ID``,
    ``?snapshot=``, ``?token=``) and bounds as a WebSocket client; see docs/protocol.md,
    "Server-Sent Events".
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        if "websocket" in request.headers.get("Upgrade", "").lower():
            # As the lean server answers a WebSocket off its endpoint.
            return web.Response(status=404, text="Not Found: this is the event stream\n")
        admission = await admission_of(hub, _handshake_request(request))
        if isinstance(admission, Refusal):
            return _refused(admission)
        config = hub.config
        response = web.StreamResponse(headers=stream_headers(admission))
        await response.prepare(request)
        transport = request.transport
        if transport is None:  # the client left meanwhile
            return response
        set_send_buffer(transport, config.socket_send_buffer)
        stream = SentStream(response.write, transport.abort, config.write_timeout)
        opened = hub.open_session(stream, admission)
        if isinstance(opened, Refusal):
            await response.write(close_record(opened.close_code, opened.reason))
            return response
        stream.sender.session = opened
        loop = asyncio.get_running_loop()
        next_heartbeat = loop.time() + config.ping_interval
        try:
            while not stream.ended.is_set() and not transport.is_closing():
                wait = min(_STREAM_CHECK, max(0.0, next_heartbeat - loop.time()))
                try:
                    await asyncio.wait_for(stream.ended.wait(), wait)
                except TimeoutError:
                    if loop.time() >= next_heartbeat:
                        stream.heartbeat()
                        next_heartbeat = loop.time() + config.ping_interval
        finally:
            stream.sender.stop()
            opened.closed(None, None)
        return response

    return handler
