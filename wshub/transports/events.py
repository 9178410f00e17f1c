"""Server-Sent Events: the hub's stream as ``text/event-stream``, for clients that cannot
speak WebSocket (a network or proxy that blocks it, ``curl -N``, a shell script).

The lean server answers ``GET /api/events`` (:data:`EVENTS_PATH`) with the same admission as a
WebSocket handshake (origin, capacity, credentials: ``?token=``, ``Authorization: Bearer`` or
the cookie) and the same query (``?topics=``, ``?since=``, ``?snapshot=``); ``Last-Event-ID``,
which a browser's ``EventSource`` sends when it reconnects, resumes as ``?since=`` does. Then
the connection's protocol becomes an :class:`EventStream`, a
:class:`~wshub.session.ClientTransport` whose ``write`` is the asyncio transport's own: the
core writes each message's record (:data:`~wshub.session.FrameKind.SSE_EVENTS`), built once
and shared by every stream, as it writes frames. Each published message is::

    id: <message id>
    event: <type>
    data: <the JSON envelope>

A direct reply (the ``connection`` greeting, an error) has no ``id:``, so it does not move the
client's resume point. A comment line (``: heartbeat``) goes out every ``ping_interval`` to
keep proxies from closing a quiet stream; a client that stops reading meets the
``slow_client_policy`` and ``write_timeout`` as a WebSocket client does. When the hub closes a
stream it sends a last record, ``event: close`` with ``{"code": ..., "reason": ...}`` (the close
code a WebSocket client would get), then ends the response. The body's end is the
connection's end (``Connection: close``, no length): no chunk framing, so the core's bytes go
to the socket as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from websockets.datastructures import Headers
from websockets.http11 import SERVER, Response

from ..session import Admission, ClientSession, FrameKind
from .messages import MessageSender

if TYPE_CHECKING:
    from .lean import HubEndpoint

__all__ = [
    "EVENTS_PATH",
    "HEARTBEAT",
    "EventStream",
    "SentStream",
    "close_record",
    "stream_head",
    "stream_headers",
]

EVENTS_PATH = "/api/events"
"""Where the lean server answers with an event stream, by default."""

HEARTBEAT = b": heartbeat\n\n"
"""The comment written to every stream each ``ping_interval``; clients ignore it."""

_SSE_EVENTS = FrameKind.SSE_EVENTS


def stream_headers(admission: Admission) -> list[tuple[str, str]]:
    """The headers of the ``200 OK`` that starts an event stream, on every server.

    A browser on another origin that the hub admitted (its ``Origin`` is in
    ``allowed_origins``, or any is allowed) may read the stream: the answer names that origin.
    """
    headers = [
        ("Content-Type", "text/event-stream; charset=utf-8"),
        # Every byte at once: nothing may cache the stream or hold it back to compress.
        ("Cache-Control", "no-store"),
        ("X-Accel-Buffering", "no"),
    ]
    origin = admission.request.origin
    if origin is not None:
        headers += [
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Credentials", "true"),
            ("Vary", "Origin"),
        ]
    return headers


def stream_head(admission: Admission) -> bytes:
    """The lean server's ``200 OK`` that starts an event stream, as bytes; the body ends
    with the connection."""
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Server", SERVER),
            *stream_headers(admission),
            ("Connection", "close"),
        ]
    )
    return Response(200, "OK", headers, b"").serialize()


def close_record(code: int, reason: str) -> bytes:
    """The last record of a stream the hub ends: the close code a WebSocket client would
    get, and its reason."""
    return b"event: close\ndata: " + orjson.dumps({"code": code, "reason": reason}) + b"\n\n"


class EventStream(asyncio.Protocol):
    """One client of an event stream: its connection's protocol once the request is
    answered, and the :class:`~wshub.session.ClientTransport` of its session.

    What the client sends after its request is read and dropped: the stream has nothing to
    receive, and dropped bytes cost no memory.
    """

    __slots__ = (
        "_closing",
        "_endpoint",
        "_lost",
        "_lost_waiter",
        "_timer",
        "session",
        "transport",
        "write",
    )

    frame_kind = _SSE_EVENTS

    def __init__(self, endpoint: HubEndpoint, transport: asyncio.Transport) -> None:
        self._endpoint = endpoint
        self.transport = transport
        self.write: Any = transport.write
        self.session: ClientSession | None = None
        self._closing = False
        self._lost = False
        self._lost_waiter: asyncio.Future[None] | None = None  # made only when awaited
        self._timer: asyncio.TimerHandle | None = None

    # wshub.session.ClientTransport

    def close(self, code: int, reason: str) -> None:
        """Send the ``close`` record and end the response; abort the connection if it has
        not ended within ``write_timeout`` (a client that does not read)."""
        if self._closing or self._lost:
            return
        self._closing = True
        if self.session is not None:
            self.session.closing()
        transport = self.transport
        if not transport.is_closing():
            transport.write(close_record(code, reason))
            transport.close()
        self._timer = self._endpoint.loop.call_later(
            self._endpoint.config.write_timeout, transport.abort
        )

    def abort(self) -> None:
        """Drop the connection at once."""
        self.transport.abort()

    def buffered_bytes(self) -> int:
        """Bytes in the transport's write buffer."""
        transport = self.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        """Dropped: a stream receives nothing."""

    def eof_received(self) -> bool | None:
        """The client ended its side: it is gone; the transport then closes."""
        return None

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None and not self._closing:
            self.session.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._endpoint.stream_ended(self)
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        session, self.session = self.session, None
        if session is not None:
            session.closed(None, None)

    # The endpoint's

    def heartbeat(self) -> None:
        """Write the heartbeat comment, unless the client is behind (it has data coming)."""
        transport = self.transport
        if (
            not self._closing
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
        ):
            transport.write(HEARTBEAT)

    def opened(self, session: ClientSession) -> None:
        self.session = session

    async def wait_lost(self) -> None:
        """Return once the connection has ended."""
        if self._lost:
            return
        if self._lost_waiter is None:
            self._lost_waiter = self._endpoint.loop.create_future()
        await asyncio.shield(self._lost_waiter)


class SentStream:
    """An event stream on a server that writes the response itself (aiohttp, ASGI): the
    :class:`~wshub.session.ClientTransport` hands each flush to a
    :class:`~.messages.MessageSender`, which awaits ``send`` for it in order and holds the
    client to the hub's bounds.

    Args:
        send: Writes bytes of the response body; raises once the client is gone.
        abort: Drops the connection (where the server offers a way).
        close_timeout: How long a close may take (``write_timeout``).
    """

    frame_kind = _SSE_EVENTS

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[object]],
        abort: Callable[[], object],
        close_timeout: float,
    ) -> None:
        self._send = send
        self._abort = abort
        self.ended = asyncio.Event()  # the hub closed it, or gave up on it
        self.finished = False  # its close record went out: the response may end cleanly
        self.sender = MessageSender(send, self._close, close_timeout, self.ended.set)

    def write(self, data: bytes) -> None:
        self.sender.write([data])

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self._send(close_record(code, reason))
            self.finished = True
        finally:
            self.ended.set()

    def heartbeat(self) -> None:
        """The heartbeat comment, behind nothing: a stream with records waiting needs none."""
        if self.sender.buffered_bytes() == 0:
            with contextlib.suppress(ConnectionError):  # closing
                self.sender.write([HEARTBEAT])

    def close(self, code: int, reason: str) -> None:
        self.sender.close(code, reason)

    def abort(self) -> None:
        self._abort()
        self.ended.set()

    def buffered_bytes(self) -> int:
        return self.sender.buffered_bytes()
