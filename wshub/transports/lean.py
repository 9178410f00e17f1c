"""The lean transport: websockets' sans-I/O protocol under a bare asyncio.Protocol.

websockets' asyncio server gives every connection a ``ServerConnection``, a handler task
parked in ``recv()``, a keepalive task and a message assembler. A hub client needs none of
that: the hub answers each message synchronously and the fan-out core writes whole frames to
the transport itself. Here a connection is one :class:`HubConnection` with ``__slots__`` and
the websockets :class:`~websockets.server.ServerProtocol` that does the protocol work
(handshake validation, framing, unmasking, answering pings, the closing handshake, UTF-8 and
size checks). There is no task per connection: incoming data is handled in
``data_received``, deadlines are timer handles, and one timer per server runs the heartbeat
for every connection. Each connection is a :class:`wshub.session.ClientTransport` whose
``write`` is the asyncio transport's own: the core's flush costs one call per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import html
import http
import importlib.resources
import logging
import resource
import ssl as ssl_module
import struct
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import SERVER, Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from ..compression import frame_kind_of, server_extensions
from ..config import HubConfig
from ..limits import (
    MAX_FRAGMENTS,
    MAX_REQUEST_HEAD,
    MAX_REQUEST_HEADERS,
    READ_BUDGET,
    set_send_buffer,
)
from ..logs import RateLimitedLog
from ..session import (
    Admission,
    ClientSession,
    FrameKind,
    HandshakeRequest,
    Refusal,
    SessionHost,
    format_address,
)
from .events import EVENTS_PATH, EventStream, stream_head

__all__ = [
    "DASHBOARD_FILES",
    "SERVE_OPTIONS",
    "HubConnection",
    "HubEndpoint",
    "StaticFile",
    "load_dashboard",
    "serve",
    "start_server",
]

logger = logging.getLogger("wshub")

# The same write buffer high-water mark as websockets' connections (its ``write_limit``
# default), so a slow client is detected at the same point as before.
WRITE_LIMIT = 2**15

_CONNECTING = State.CONNECTING
_OPEN = State.OPEN
_WEBSOCKET_FRAMES = FrameKind.WEBSOCKET_FRAMES
_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_CONT = Opcode.CONT
_PING = Opcode.PING
_PONG = Opcode.PONG
_HEAD_END = b"\r\n\r\n"
_PING_DATA = struct.Struct("!d")  # the loop time a keepalive ping was sent: its pong echoes it

# Close codes (RFC 6455 7.4.1), with the reasons websockets uses for the same events.
_GOING_AWAY = 1001
_INVALID_DATA = 1007
_MESSAGE_TOO_BIG = 1009
_INTERNAL_ERROR = 1011


# The dashboard's files in wshub/static/, by the URL path that serves each one, with its
# media type. A fixed table, not a directory listing: nothing else in the package (or beside
# it) can be reached over HTTP, whatever the request path.
DASHBOARD_FILES: Mapping[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/wshub.js": ("wshub.js", "text/javascript; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}

# The page may load only what the hub serves and connect only back to it: the dashboard uses
# no external assets, and this keeps it that way should someone add one. ws:/wss: are listed
# because older browsers do not count a WebSocket to the same host as 'self'.
_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclasses.dataclass(frozen=True, slots=True)
class StaticFile:
    """One file served over plain HTTP: its bytes and the headers that describe them.

    Attributes:
        body: The file's content.
        content_type: The ``Content-Type`` header.
        headers: More response headers (``Cache-Control``, ...).
    """

    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> Response:
        """A fresh ``200 OK`` carrying the file; the connection closes after it."""
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                # One request per connection: the sans-I/O protocol ends the stream after a
                # response that is not a 101, so say so rather than let a browser hope.
                ("Connection", "close"),
                ("Content-Length", str(len(self.body))),
                ("Content-Type", self.content_type),
                *self.headers,
            ]
        )
        return Response(http.HTTPStatus.OK.value, http.HTTPStatus.OK.phrase, headers, self.body)


# The page's pointer to the WebSocket endpoint, rewritten for a server whose ``path`` is not
# the default, so that the dashboard connects wherever the hub listens.
_ENDPOINT_META = '<meta name="wshub-endpoint" content="{}">'


def load_dashboard(path: str = "/api/ws") -> dict[str, StaticFile]:
    """Read the dashboard's files from the package, once, by the URL path that serves each.

    ``path`` is the WebSocket endpoint the page connects to; it is written into the page.
    A file that is not there is left out (that path answers 404) and logged as a warning,
    so a partial install still serves what it has instead of refusing to start.
    """
    folder = importlib.resources.files("wshub") / "static"
    files: dict[str, StaticFile] = {}
    for url_path, (name, content_type) in DASHBOARD_FILES.items():
        try:
            body = (folder / name).read_bytes()
        except OSError:
            logger.warning("dashboard: wshub/static/%s is missing; %s answers 404", name, url_path)
            continue
        # no-cache: the browser asks again on every load, so a page never runs a stale
        # wshub.js against a hub that was upgraded under it (there is no versioned name).
        headers = [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")]
        if url_path == "/":
            headers.append(("Content-Security-Policy", _CONTENT_SECURITY_POLICY))
            body = body.replace(
                _ENDPOINT_META.format("/api/ws").encode(),
                _ENDPOINT_META.format(html.escape(path)).encode(),
            )
        files[url_path] = StaticFile(body, content_type, tuple(headers))
    return files


def _is_upgrade(request: Request) -> bool:
    """Whether ``request`` asks for a WebSocket (any ``Upgrade`` header naming websocket)."""
    return any("websocket" in value.lower() for value in request.headers.get_all("Upgrade"))


def _method_not_allowed(protocol: ServerProtocol) -> Response:
    response = protocol.reject(http.HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n")
    response.headers["Allow"] = "GET"
    return response


def _wants_events(request: Request, endpoint: HubEndpoint) -> bool:
    """Whether ``request`` asks for the event stream (a plain request to its path)."""
    path = urllib.parse.urlsplit(request.path).path
    return path == endpoint.events_path and not _is_upgrade(request)


def _wrong_version(request: Request) -> bool:
    """Whether ``request`` asks for a WebSocket version other than 13 (RFC 6455)."""
    return request.headers.get_all("Sec-WebSocket-Version") != ["13"]


def _handshake_request(request: Request, peer: Any) -> HandshakeRequest:
    """What the hub sees of ``request``; repeated headers are joined with ", "."""
    return HandshakeRequest.from_target(
        request.path, request.headers.raw_items(), format_address(peer)
    )


def _admission_failed(endpoint: HubEndpoint) -> Refusal:
    """The hub's bug, not the client's: logged, answered 500, and the server serves on."""
    endpoint.log.exception("admission failed")
    return Refusal(500, "Internal Server Error", _INTERNAL_ERROR)


class HubEndpoint:
    """One listening endpoint: the protocol factory, its connections and the heartbeat timer.

    Pass it to ``loop.create_server`` as the protocol factory (:func:`start_server` does).
    It keeps every connection from ``connection_made`` to ``connection_lost``, and one timer
    for all of them: protocol pings and the pong deadline with ``enable_ping_pong``, the
    silence deadline (``read_timeout``) without; and one for the event streams' heartbeat.

    Args:
        hub: The hub whose clients connect here; it must be running to accept them.
        path: The WebSocket endpoint; other paths get HTTP 404.
        static: Files answered to plain HTTP ``GET`` requests, by URL path (see
            :func:`load_dashboard`); None or empty serves none.
        events_path: Where ``GET`` opens a Server-Sent Events stream
            (:mod:`wshub.transports.events`); None serves none.
    """

    def __init__(
        self,
        hub: SessionHost,
        *,
        path: str = "/api/ws",
        static: Mapping[str, StaticFile] | None = None,
        events_path: str | None = EVENTS_PATH,
    ) -> None:
        self.hub = hub
        self.path = path
        self.events_path = events_path
        self.static: Mapping[str, StaticFile] = static or {}
        self.config: HubConfig = hub.config
        self.loop = asyncio.get_running_loop()
        # Pending handshakes and open connections alike, so that aclose() reaches both.
        self.connections: dict[HubConnection, None] = {}
        # Connections that became event streams (they left ``connections`` then).
        self.streams: dict[EventStream, None] = {}
        self._stream_heartbeat: asyncio.TimerHandle | None = None
        self.handshakes = 0  # connections whose opening handshake is not answered yet
        # Admissions being decided (an authenticate hook, a key set): cancelled by aclose().
        self.admissions: set[asyncio.Future[Admission | Refusal]] = set()
        # A connection whose socket gets a number this high leaves fewer than the reserve
        # free: the kernel hands out the lowest free number, so every one below is in use.
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.last_descriptor = (
            None
            if soft_limit == resource.RLIM_INFINITY
            else soft_limit - self.config.file_descriptor_reserve
        )
        self.log = RateLimitedLog(logger)
        # permessage-deflate as compression says, one factory for every connection.
        self.extensions = server_extensions(self.config.compression)
        self._heartbeat: asyncio.TimerHandle | None = None
        # Pong deadlines of the ping rounds in flight, by the round's loop time (more than
        # one when pong_timeout is longer than ping_interval).
        self._pong_checks: dict[float, asyncio.TimerHandle] = {}
        self._closed = False

    def __call__(self) -> HubConnection:
        """Make the protocol object for one new TCP connection."""
        return HubConnection(self)

    # Heartbeat: one timer for every connection of the endpoint.

    def connection_opened(self) -> None:
        """A connection completed its handshake: make sure the heartbeat runs."""
        if self._heartbeat is None and not self._closed:
            if self.config.enable_ping_pong:
                self._heartbeat = self.loop.call_later(self.config.ping_interval, self._ping)
            else:
                self._heartbeat = self.loop.call_later(
                    self.config.read_timeout, self._check_silence
                )

    def _open_connections(self) -> list[HubConnection]:
        return [
            connection
            for connection in self.connections
            if connection.session is not None and connection.protocol.state is _OPEN
        ]

    def _ping(self) -> None:
        """Ping every open connection without a ping in flight; check the pongs later."""
        self._heartbeat = None
        now = self.loop.time()
        open_connections = self._open_connections()
        pinged = False
        for connection in open_connections:
            if connection.ping_sent is None:
                connection._send_ping(now)
                pinged = True
        if pinged:
            self._pong_checks[now] = self.loop.call_at(
                now + self.config.pong_timeout, self._check_pongs, now
            )
        if open_connections and not self._closed:
            self._heartbeat = self.loop.call_later(self.config.ping_interval, self._ping)

    def _check_pongs(self, round_sent: float) -> None:
        """Fail the connections that have not answered the ping round sent at ``round_sent``."""
        self._pong_checks.pop(round_sent, None)
        for connection in self._open_connections():
            sent = connection.ping_sent
            if sent is not None and sent <= round_sent:
                connection._fail(_INTERNAL_ERROR, "keepalive ping timeout")

    def _check_silence(self) -> None:
        """Close connections from which nothing arrived for ``read_timeout``."""
        self._heartbeat = None
        limit = self.config.read_timeout
        now = self.loop.time()
        earliest: float | None = None
        for connection in self._open_connections():
            deadline = connection.last_received + limit
            if deadline <= now:
                connection._start_close(_INTERNAL_ERROR, "read timeout")
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None and not self._closed:
            # Next check at the earliest deadline, but no sooner than a tenth of read_timeout
            # (at most 1 s) from now: a check visits every connection, and a silent client
            # is closed at most that late.
            slack = min(limit / 10, 1.0)
            self._heartbeat = self.loop.call_at(max(earliest, now + slack), self._check_silence)

    # Event streams

    def stream_opened(self, stream: EventStream) -> None:
        """A connection became an event stream: make sure the heartbeat runs."""
        self.streams[stream] = None
        if self._stream_heartbeat is None and not self._closed:
            self._stream_heartbeat = self.loop.call_later(
                self.config.ping_interval, self._heartbeat_streams
            )

    def stream_ended(self, stream: EventStream) -> None:
        self.streams.pop(stream, None)

    def _heartbeat_streams(self) -> None:
        self._stream_heartbeat = None
        for stream in self.streams:
            stream.heartbeat()
        if self.streams and not self._closed:
            self._stream_heartbeat = self.loop.call_later(
                self.config.ping_interval, self._heartbeat_streams
            )

    # Shutdown

    async def aclose(self) -> None:
        """Stop the heartbeat, abort pending handshakes and wait for every connection to end.

        Call it after the listening server is closed and the hub stopped (which closes every
        hub client with 1001). A connection still closing gets ``write_timeout`` to finish,
        then its transport is aborted.
        """
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._stream_heartbeat is not None:
            self._stream_heartbeat.cancel()
            self._stream_heartbeat = None
        for check in self._pong_checks.values():
            check.cancel()
        self._pong_checks.clear()
        for admission in list(self.admissions):
            admission.cancel()
        connections = list(self.connections)
        for connection in connections:
            if connection.protocol.state is _CONNECTING:
                connection.transport.abort()
            elif connection.protocol.state is _OPEN:  # not a hub client (the hub stopped)
                connection._start_close(_GOING_AWAY, "server shutdown")
        streams = list(self.streams)
        for stream in streams:
            stream.close(_GOING_AWAY, "server shutdown")  # no-op for those the hub closed
        if not connections and not streams:
            return
        waiters = [self.loop.create_task(c._wait_lost()) for c in connections]
        waiters += [self.loop.create_task(stream.wait_lost()) for stream in streams]
        _, pending = await asyncio.wait(waiters, timeout=self.config.write_timeout)
        if pending:
            for connection in list(self.connections):
                connection.transport.abort()
            for stream in list(self.streams):
                stream.abort()
            await asyncio.wait(pending)


class HubConnection(asyncio.Protocol):
    """One client: an asyncio protocol that drives websockets' sans-I/O ``ServerProtocol``.

    It is the :class:`wshub.session.ClientTransport` of its client: ``write`` is the asyncio
    transport's ``write``, ``close`` begins the closing handshake, and it tells the client's
    session when writing pauses and resumes, when the closing handshake begins and when the
    connection is lost. Bytes the protocol generates (the handshake response, pongs, close
    frames) are written to the transport at once as whole frames, so they interleave safely
    with the core's whole-frame writes.
    """

    __slots__ = (
        "_backlog",
        "_closing_told",
        "_endpoint",
        "_fragment_count",
        "_fragment_text",
        "_fragments",
        "_handshaking",
        "_head",
        "_lost",
        "_lost_waiters",
        "_timer",
        "frame_kind",
        "last_received",
        "ping_sent",
        "protocol",
        "session",
        "transport",
        "write",
    )

    def __init__(self, endpoint: HubEndpoint) -> None:
        config = endpoint.config
        self._endpoint = endpoint
        self.protocol = ServerProtocol(
            extensions=endpoint.extensions, max_size=config.max_message_size
        )
        # What the core writes: compressed frames once the handshake negotiated the hub's
        # permessage-deflate parameters, else plain ones.
        self.frame_kind = _WEBSOCKET_FRAMES
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.write: Any = None  # the transport's write, set with it
        self.session: ClientSession | None = None
        # Loop time of the unanswered keepalive ping, None when none is in flight.
        self.ping_sent: float | None = None
        # Loop time data last arrived (the silence deadline without ping/pong).
        self.last_received = 0.0
        # The handshake deadline, then the closing deadline; None while open.
        self._timer: asyncio.TimerHandle | None = None
        self._fragments: bytearray | None = None  # a fragmented message being assembled
        self._fragment_count = 0
        self._fragment_text = False
        # The opening request head as it arrives; None once it is answered (or never counted).
        self._head: bytearray | None = None
        # Counted in the endpoint's handshakes, from connection_made until it is answered.
        self._handshaking = False
        # Bytes read but not handled yet (past READ_BUDGET); reading is paused meanwhile.
        self._backlog: memoryview | None = None
        self._lost = False
        self._closing_told = False  # the session knows the closing handshake began
        # Created only when someone waits, so an idle connection carries no futures.
        self._lost_waiters: list[asyncio.Future[None]] | None = None

    # wshub.session.ClientTransport

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Begin the closing handshake; the transport is aborted if the client has not
        completed it and closed the TCP connection within ``write_timeout``."""
        self._start_close(code, reason)

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        self.transport.abort()

    def buffered_bytes(self) -> int:
        """Bytes in the transport's write buffer."""
        transport = self.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    @property
    def state(self) -> State:
        """The WebSocket state: CONNECTING, OPEN, CLOSING or CLOSED."""
        return self.protocol.state

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the handshake deadline (``open_timeout``), or close the connection at once
        when ``max_pending_handshakes`` connections are handshaking already."""
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.write = transport.write
        endpoint = self._endpoint
        if endpoint.handshakes >= endpoint.config.max_pending_handshakes:
            transport.abort()
            return
        last = endpoint.last_descriptor
        sock = transport.get_extra_info("socket")
        if last is not None and sock is not None and sock.fileno() >= last:
            endpoint.log.warning(
                "refusing a connection: fewer than file_descriptor_reserve (%d) file "
                "descriptors are free",
                endpoint.config.file_descriptor_reserve,
            )
            self._refuse(http.HTTPStatus.SERVICE_UNAVAILABLE, "Server at capacity\n")
            return
        transport.set_write_buffer_limits(WRITE_LIMIT)
        set_send_buffer(transport, endpoint.config.socket_send_buffer)
        endpoint.connections[self] = None
        endpoint.handshakes += 1
        self._handshaking = True
        self._head = bytearray()
        self._timer = endpoint.loop.call_later(
            endpoint.config.open_timeout, self._handshake_timeout
        )

    def data_received(self, data: bytes) -> None:
        """Take the request head, then frames, at most ``READ_BUDGET`` bytes per loop
        iteration: a larger read is handled over the next iterations, reading paused."""
        if self._head is not None:
            self._head_received(data)
        elif self._backlog is not None:  # read before the pause took effect: keep the order
            self._backlog = memoryview(bytes(self._backlog) + data)
        elif len(data) > READ_BUDGET:
            self._backlog = memoryview(data)[READ_BUDGET:]
            self.transport.pause_reading()
            self._endpoint.loop.call_soon(self._read_backlog)
            self._handle_data(data[:READ_BUDGET])
        else:
            self._handle_data(data)

    def _continue_reading(self) -> None:
        """Read again after a pause: what waited in the backlog first."""
        if not self._backlog:
            self._backlog = None
            if not self._lost and not self.transport.is_closing():
                self.transport.resume_reading()
        else:
            self._endpoint.loop.call_soon(self._read_backlog)

    def _read_backlog(self) -> None:
        backlog = self._backlog
        if backlog is None or self._lost:
            self._backlog = None
            return
        chunk = bytes(backlog[:READ_BUDGET])
        rest = backlog[READ_BUDGET:]
        self._backlog = rest if len(rest) else None
        self._handle_data(chunk)
        if self._backlog is not None:
            self._endpoint.loop.call_soon(self._read_backlog)
        elif not self._lost and not self.transport.is_closing():
            self.transport.resume_reading()

    def _head_received(self, data: bytes) -> None:
        """Collect the request head; hand the protocol the head alone, so that it is
        answered before any byte after it (pipelined data) is read as frames."""
        head = self._head
        assert head is not None
        searched = max(0, len(head) - len(_HEAD_END) + 1)
        head += data
        end = head.find(_HEAD_END, searched)
        if end < 0 or end + len(_HEAD_END) > MAX_REQUEST_HEAD:
            if len(head) > MAX_REQUEST_HEAD:
                self._refuse_head()
            return
        end += len(_HEAD_END)
        self._head = None  # what follows is frames, read once the request is answered
        self._handle_data(bytes(head[:end]))  # the request
        if len(head) > end and self.transport.get_protocol() is self:  # not a stream now
            self.data_received(bytes(head[end:]))

    def _handshake_done(self) -> None:
        """The request is answered (or the connection lost): it is pending no more."""
        if self._handshaking:
            self._handshaking = False
            self._endpoint.handshakes -= 1

    def _refuse_head(self) -> None:
        self._head = None
        self._refuse(
            http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"Request head larger than {MAX_REQUEST_HEAD} bytes\n",
        )

    def _refuse(self, status: http.HTTPStatus, text: str) -> None:
        """Answer with an HTTP error before the request is read, and close."""
        self._respond(self.protocol.reject(status, text))
        self._arm_close_deadline()

    def _respond(self, response: Response) -> None:
        """Answer the opening request (the handshake deadline is over) and write it."""
        response.headers["Server"] = SERVER
        self._handshake_done()
        self.protocol.send_response(response)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._send_data()

    def _handle_data(self, data: bytes) -> None:
        """Feed the protocol, write what it answers, then handle the request or messages."""
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._send_data()  # pongs to client pings, replies to close frames
        self._arm_close_deadline()  # the client closed, or broke the protocol
        if not self._endpoint.config.enable_ping_pong:
            self.last_received = self._endpoint.loop.time()
        for event in events:
            if isinstance(event, Frame):
                self._frame_received(event)
            elif isinstance(event, Request):
                self._handshake(event)

    def eof_received(self) -> bool | None:
        """Let the protocol see the end of the stream; the transport then closes."""
        self.protocol.receive_eof()
        self._send_data()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Close the protocol, wake whoever waits, and tell the session."""
        self._lost = True
        self._head = None
        self._handshake_done()
        self._backlog = None
        self.protocol.receive_eof()  # idempotent; the state becomes CLOSED
        self.protocol.data_to_send()  # nothing can be written any more
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fragments = None
        endpoint = self._endpoint
        endpoint.connections.pop(self, None)
        for waiter in self._lost_waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        session, self.session = self.session, None  # breaks the session <-> connection cycle
        if session is not None:
            session.closed(self.protocol.close_code, self.protocol.close_reason)

    def pause_writing(self) -> None:
        """The transport is above its high-water mark: the core stops writing."""
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        """The transport drained below its low-water mark: the core writes what it kept."""
        if self.session is not None and self.protocol.state is _OPEN:
            self.session.resume_writing()

    # The opening handshake

    def _handshake(self, request: Request) -> None:
        endpoint = self._endpoint
        protocol = self.protocol
        target = urllib.parse.urlsplit(request.path).path
        events = _wants_events(request, endpoint)
        if events and request.method != "GET":
            response = _method_not_allowed(protocol)
        elif not events and target != endpoint.path:
            # A WebSocket upgrade off the endpoint is a 404 whatever the path: a file is
            # answered only to a plain request.
            static = endpoint.static.get(target)
            if _is_upgrade(request):
                # A client pointed at the wrong path: one line that tells it the right one.
                response = protocol.reject(
                    http.HTTPStatus.NOT_FOUND,
                    f"Not Found: the WebSocket endpoint here is {endpoint.path}\n",
                )
            elif static is None:
                response = protocol.reject(http.HTTPStatus.NOT_FOUND, "Not Found\n")
            elif request.method != "GET":
                response = _method_not_allowed(protocol)
            else:
                response = static.response()
        elif sum(1 for _ in request.headers.raw_items()) > MAX_REQUEST_HEADERS:
            response = protocol.reject(
                http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"More than {MAX_REQUEST_HEADERS} header lines\n",
            )
        else:  # the WebSocket endpoint, or the event stream
            self._admit(request)
            return
        self._respond(response)
        self._arm_close_deadline()  # not a WebSocket: the protocol half-closed the stream

    def _admit(self, request: Request) -> None:
        """Ask the hub whether it takes the client: at once, or (an ``authenticate`` hook,
        a key set) in a task, while bytes that arrive meanwhile wait, reading paused."""
        endpoint = self._endpoint
        handshake = _handshake_request(request, self.transport.get_extra_info("peername"))
        try:
            answer = endpoint.hub.admit(handshake)
        except Exception:
            self._answer(request, _admission_failed(endpoint))
            return
        if isinstance(answer, Admission | Refusal):
            self._answer(request, answer)
            return
        if self._backlog is None:
            self._backlog = memoryview(b"")
        self.transport.pause_reading()
        task = asyncio.ensure_future(answer)
        endpoint.admissions.add(task)
        task.add_done_callback(lambda done: self._admitted(request, done))

    def _admitted(self, request: Request, task: asyncio.Future[Admission | Refusal]) -> None:
        self._endpoint.admissions.discard(task)
        if self._lost or task.cancelled():
            return
        try:
            answer = task.result()
        except Exception:
            answer = _admission_failed(self._endpoint)
        self._answer(request, answer)
        self._continue_reading()

    def _answer(self, request: Request, answer: Admission | Refusal) -> None:
        protocol = self.protocol
        admission = None
        if isinstance(answer, Refusal):
            response = protocol.reject(answer.status, f"{answer.reason}\n")
            for name, value in answer.headers:
                response.headers[name] = value
        elif _wants_events(request, self._endpoint):
            request.headers = Headers()
            self._stream(answer)
            return
        else:
            admission = answer
            # Validates the handshake; a bad request gets a 4xx here.
            response = protocol.accept(request)
            if response.status_code != 101 and _wrong_version(request):
                # RFC 6455 4.4: 426 naming the version this server speaks.
                response = protocol.reject(
                    http.HTTPStatus.UPGRADE_REQUIRED, "Sec-WebSocket-Version must be 13\n"
                )
                response.headers["Sec-WebSocket-Version"] = "13"
        self._respond(response)
        # websockets' parser keeps the request for the life of the connection; its headers
        # (each held twice, ~2 KiB, a third of an idle client) are not needed any more.
        request.headers = Headers()
        if admission is None or protocol.state is not _OPEN:
            self._arm_close_deadline()  # refused: the protocol half-closed the connection
        else:
            self._open(admission)

    def _stream(self, admission: Admission) -> None:
        """Answer with an event stream, and hand the connection to an :class:`EventStream`,
        the client's transport from now on; this object is done."""
        endpoint = self._endpoint
        self._handshake_done()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._backlog = None  # anything sent after the request is dropped, not read
        endpoint.connections.pop(self, None)
        transport = self.transport
        stream = EventStream(endpoint, transport)
        transport.set_protocol(stream)
        transport.write(stream_head(admission))
        endpoint.stream_opened(stream)
        opened = endpoint.hub.open_session(stream, admission)
        if isinstance(opened, Refusal):  # the hub filled up or stopped meanwhile
            stream.close(opened.close_code, opened.reason)
            return
        stream.opened(opened)

    def _open(self, admission: Admission) -> None:
        endpoint = self._endpoint
        self.last_received = endpoint.loop.time()
        self.frame_kind = frame_kind_of(self.protocol.extensions)
        # Capacity is checked again: the hub may have filled up while this client waited.
        opened = endpoint.hub.open_session(self, admission)
        if isinstance(opened, Refusal):
            self._start_close(opened.close_code, opened.reason)
            return
        self.session = opened
        endpoint.connection_opened()

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.protocol.state is _CONNECTING:
            self.transport.abort()

    # Messages

    def _frame_received(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if frame.fin:
                self._message_received(opcode is _TEXT, bytes(frame.data))
            else:
                self._fragments = bytearray(frame.data)
                self._fragment_count = 1
                self._fragment_text = opcode is _TEXT
            return
        if opcode is _CONT:
            fragments = self._fragments
            if fragments is None:
                return
            fragments += frame.data
            self._fragment_count += 1
            # The protocol enforces max_size across fragments already; this keeps the
            # bound true here whatever the protocol does.
            if len(fragments) > self._endpoint.config.max_message_size:
                self._fragments = None
                self._fail(_MESSAGE_TOO_BIG, "message too big")
            elif self._fragment_count > MAX_FRAGMENTS:
                self._fragments = None
                self._fail(_MESSAGE_TOO_BIG, f"more than {MAX_FRAGMENTS} fragments")
            elif frame.fin:
                self._fragments = None
                self._message_received(self._fragment_text, bytes(fragments))
            return
        # Pings are answered and close frames handled by the protocol itself; control
        # frames count against the client's rate limit, and only a pong that echoes the
        # keepalive ping proves the client alive.
        session = self.session
        if opcode is _PONG:
            sent = self.ping_sent
            if sent is not None and frame.data == _PING_DATA.pack(sent):
                self.ping_sent = None
        if (opcode is _PING or opcode is _PONG) and session is not None:
            session.control_received()

    def _message_received(self, text: bool, data: bytes) -> None:
        session = self.session
        if session is None or self.protocol.state is not _OPEN:
            return  # closing: the hub no longer reads from this client
        message: str | bytes = data
        if text:
            try:
                message = data.decode()
            except UnicodeDecodeError as exc:
                self._fail(_INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        session.received(message)

    # Writing, closing, heartbeats

    def _send_data(self) -> None:
        """Write what the protocol produced; an empty item means: end the TCP stream."""
        transport = self.transport
        for data in self.protocol.data_to_send():
            if self._lost or transport.is_closing():
                continue  # too late: drop it, as the transport would
            if data:
                transport.write(data)
                if transport.get_write_buffer_size() > self._endpoint.config.max_buffered_bytes:
                    # Pongs and close frames pile up for a client that reads nothing: the
                    # same bound as the hub's own frames, past which it is dropped.
                    transport.abort()
                    return
            else:
                # The server closes the TCP connection first (RFC 6455 7.1.1), once the
                # buffered data is written, rather than wait for a client that may never
                # close its side; the close deadline aborts one that does not drain.
                transport.close()
        if not self._closing_told and self.protocol.state is not _OPEN:
            session = self.session
            if session is not None:
                # The closing handshake began (either side): the wire is the protocol's now.
                self._closing_told = True
                session.closing()

    def _arm_close_deadline(self) -> None:
        """The TCP connection should end soon; abort it if it has not in ``write_timeout``."""
        if self._timer is None and not self._lost and self.protocol.close_expected():
            self._timer = self._endpoint.loop.call_later(
                self._endpoint.config.write_timeout, self._close_timeout
            )

    def _close_timeout(self) -> None:
        self._timer = None
        self.transport.abort()

    def _start_close(self, code: int, reason: str) -> None:
        """Begin the closing handshake (nothing to do when it has begun already)."""
        if self.protocol.state is _OPEN:
            self.protocol.send_close(code, reason)
            self._send_data()
        elif self.protocol.state is _CONNECTING and not self._lost:
            self.transport.abort()
            return
        self._arm_close_deadline()

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection: a close frame, then the end of the stream, without waiting."""
        self.protocol.fail(code, reason)
        self._send_data()
        self._arm_close_deadline()

    def _send_ping(self, now: float) -> None:
        self.protocol.send_ping(_PING_DATA.pack(now))
        self._send_data()
        self.ping_sent = now

    async def _wait_lost(self) -> None:
        if self._lost:
            return
        waiter: asyncio.Future[None] = self._endpoint.loop.create_future()
        if self._lost_waiters is None:
            self._lost_waiters = []
        self._lost_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._lost_waiters.remove(waiter)


async def start_server(
    hub: SessionHost,
    host: str | Sequence[str] | None,
    port: int | None,
    *,
    path: str = "/api/ws",
    events_path: str | None = EVENTS_PATH,
    ssl: ssl_module.SSLContext | None = None,
    backlog: int = 4096,
    dashboard: bool = False,
    **create_server_options: Any,
) -> tuple[asyncio.Server, HubEndpoint]:
    """Listen for hub clients on ``host:port`` at ``path``; returns the server and endpoint.

    The hub must be running to accept clients (handshakes get HTTP 503 otherwise). To shut
    down, close the returned server, stop the hub (that closes every hub client with 1001)
    and ``await endpoint.aclose()``, which also aborts handshakes still pending.
    :func:`serve` does all of this.

    Args:
        hub: The hub whose clients connect here.
        host: Interface(s) to listen on.
        port: TCP port; 0 picks a free one (read it from ``server.sockets``).
        path: The WebSocket endpoint; other paths get HTTP 404.
        events_path: Where a plain ``GET`` opens a Server-Sent Events stream of the same
            messages (:mod:`wshub.transports.events`); None serves none.
        ssl: An ``ssl.SSLContext`` for ``wss://``; its handshake deadline is ``open_timeout``,
            its shutdown deadline ``write_timeout``.
        backlog: The listen queue, large so that a crowd of dashboards reconnecting at once
            is not refused by the kernel.
        dashboard: Also answer plain HTTP ``GET`` of ``/`` (the browser dashboard) and of
            the files it loads (:data:`DASHBOARD_FILES`), read from ``wshub/static/`` once,
            here; each answer closes its connection. Other paths still get 404.
        **create_server_options: More keyword arguments for ``loop.create_server``
            (``reuse_port``, ``family``, ...).
    """
    # Read here, once: a request then costs no file system access, and an install that
    # lacks a file says so at start-up rather than at the first browser.
    static = load_dashboard(path) if dashboard else None
    endpoint = HubEndpoint(hub, path=path, static=static, events_path=events_path)
    if ssl is not None:
        create_server_options.setdefault("ssl_handshake_timeout", hub.config.open_timeout)
        create_server_options.setdefault("ssl_shutdown_timeout", hub.config.write_timeout)
    create_server_options.setdefault("reuse_address", True)
    server = await endpoint.loop.create_server(
        endpoint, host, port, ssl=ssl, backlog=backlog, **create_server_options
    )
    return server, endpoint


# loop.create_server options that make sense here; websockets' own options (compression,
# ping_interval, process_request, ...) have no meaning on the lean server.
SERVE_OPTIONS = frozenset(
    {"backlog", "family", "reuse_port", "ssl_handshake_timeout", "ssl_shutdown_timeout"}
)


@contextlib.asynccontextmanager
async def serve(
    hub: Any,
    host: str | None,
    port: int | None,
    *,
    path: str = "/api/ws",
    events_path: str | None = EVENTS_PATH,
    ssl: Any = None,
    dashboard: bool = False,
    **kwargs: Any,
) -> AsyncIterator[asyncio.Server]:
    """Serve ``hub`` on ``host:port`` at ``path`` for the duration of an ``async with`` block.

    Starts the hub when it is not running. Leaving the block stops listening, stops the hub
    (every client gets the ``disconnection`` message and a 1001 close), aborts handshakes
    still pending and waits until every connection has ended.

    The server is this module's: websockets' sans-I/O protocol under a lean asyncio
    protocol, with no task per connection. Every setting comes from ``hub.config``.

    Args:
        hub: The :class:`wshub.Hub` whose clients connect here.
        host: Interface to listen on.
        port: TCP port; 0 picks a free one (read it from ``server.sockets``).
        path: The WebSocket endpoint; other paths get HTTP 404.
        events_path: Where a plain ``GET`` opens a Server-Sent Events stream of the same
            messages, with the same admission (docs/protocol.md); None serves none.
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
            :func:`wshub.server_options`.
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
    server, endpoint = await start_server(
        hub,
        host,
        port,
        path=path,
        events_path=events_path,
        ssl=ssl,
        dashboard=dashboard,
        **kwargs,
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
