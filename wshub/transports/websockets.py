"""The websockets transport: hub clients on websockets' own asyncio server.

For applications that already run ``websockets.asyncio.server.serve`` and route some
connections to the hub::

    async with websockets.asyncio.server.serve(hub.handler, host, port,
                                               **wshub.server_options(hub)):
        ...

:func:`server_options` makes the server create :class:`HubServerConnection` objects: the
connection tells the hub when its transport pauses and resumes, and the core writes the
frames it built once straight to the connection's socket (whole frames, like websockets'
own pings and close frames, so they never interleave). A connection made without it (a plain
``ServerConnection``) still works: the hub then hands it each message's text and
:class:`~wshub.transports.messages.MessageSender` sends them with ``connection.send()``, one
``send`` per message per client.

websockets runs a task per connection, a keepalive task and a message assembler; the lean
server (:mod:`wshub.transports.lean`) needs none of them and is what :func:`wshub.serve` uses.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from ..compression import frame_kind_of, server_extensions
from ..limits import set_send_buffer
from ..session import (
    Admission,
    ClientSession,
    FrameKind,
    HandshakeRequest,
    Refusal,
    SessionHost,
    admission_of,
    format_address,
)
from .messages import MessageSender

__all__ = ["HubServerConnection", "serve_connection", "server_options"]

_OPEN = State.OPEN
_INTERNAL_ERROR = 1011


def _handshake_request(request: Request, remote_address: Any) -> HandshakeRequest:
    return HandshakeRequest.from_target(
        request.path, request.headers.raw_items(), format_address(remote_address)
    )


class HubServerConnection(ServerConnection):
    """A websockets ``ServerConnection`` that reports flow control to its hub session.

    ``pause_writing``, ``resume_writing`` and ``connection_made`` are asyncio's protocol
    callbacks; they are extended, not changed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hub_session: ClientSession | None = None
        # What process_request's admission found, for serve_connection to open with.
        self.hub_admission: Admission | None = None
        self.socket_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.socket_transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.hub_session is not None:
            self.hub_session.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.hub_session is not None and self.state is _OPEN:
            self.hub_session.resume_writing()


class _Client:
    """The :class:`~wshub.session.ClientTransport` of one websockets connection."""

    def __init__(self, connection: ServerConnection, close_timeout: float) -> None:
        self.connection = connection
        self._close_timeout = close_timeout
        self.session: ClientSession | None = None
        self._closing_task: asyncio.Task[None] | None = None
        self._sender: MessageSender | None = None
        self.write: Callable[[Any], object]
        if isinstance(connection, HubServerConnection) and connection.socket_transport:
            self.frame_kind = frame_kind_of(connection.protocol.extensions)
            self._socket = connection.socket_transport
            self.write = self._write_frames
        else:
            self.frame_kind = FrameKind.TEXT_MESSAGES
            self._sender = MessageSender(self._send_text, self._close_now, close_timeout)
            self.write = self._sender.write

    def _write_frames(self, data: bytes) -> None:
        # websockets may have begun a close of its own (keepalive timeout, a protocol error
        # by the client): after its close frame nothing else may go out.
        if self.connection.state is not _OPEN:
            self._tell_closing()
            raise ConnectionError("the connection is closing")
        self._socket.write(data)

    async def _send_text(self, payload: bytes) -> None:
        await self.connection.send(payload, text=True)

    async def _close_now(self, code: int, reason: str) -> None:
        # websockets bounds the closing handshake by close_timeout, but writing its close
        # frame waits for the socket to drain, without a bound: bound it here.
        try:
            async with asyncio.timeout(self._close_timeout):
                await self.connection.close(code, reason)
        except TimeoutError:
            self.abort()

    def _tell_closing(self) -> None:
        if self.session is not None:
            self.session.closing()

    def close(self, code: int, reason: str) -> None:
        if self._sender is not None:
            self._sender.close(code, reason)
            return
        self._tell_closing()
        if self._closing_task is None:
            self._closing_task = asyncio.get_running_loop().create_task(
                self._close_now(code, reason)
            )

    def abort(self) -> None:
        if self._sender is None:
            self._socket.abort()
        elif self.session is not None:
            # A plain connection offers no abort: the hub forgets the client, and websockets'
            # own deadlines end the connection.
            self.session.closed(None, None)

    def buffered_bytes(self) -> int:
        if self._sender is not None:
            return self._sender.buffered_bytes()
        transport = self._socket
        return 0 if transport.is_closing() else transport.get_write_buffer_size()


async def serve_connection(hub: SessionHost, connection: ServerConnection) -> None:
    """Serve an accepted websockets connection as a hub client until it closes.

    The client starts with the topics of the URL's ``?topics=a,b`` or ``default_topics``,
    receives a ``connection`` message and is then served. A hub that filled up or is stopping
    closes it with 1013 or 1001. A connection that :func:`server_options`' ``process_request``
    did not admit before its handshake is admitted here, and closed (4001 for credentials
    the hub refuses) if the hub does not take it.
    """
    assert connection.request is not None
    admission = connection.hub_admission if isinstance(connection, HubServerConnection) else None
    if admission is None:
        request = _handshake_request(connection.request, connection.remote_address)
        answer = await admission_of(hub, request)
        if isinstance(answer, Refusal):
            await connection.close(answer.close_code, answer.reason)
            return
        admission = answer
    set_send_buffer(connection.transport, hub.config.socket_send_buffer)
    client = _Client(connection, hub.config.write_timeout)
    opened = hub.open_session(client, admission)
    if isinstance(opened, Refusal):
        await connection.close(opened.close_code, opened.reason)
        return
    client.session = opened
    if client._sender is not None:
        client._sender.session = opened
    if isinstance(connection, HubServerConnection):
        connection.hub_session = opened
    config = hub.config
    # With protocol pings websockets' keepalive judges liveness; without them, silence does.
    idle_limit = None if config.enable_ping_pong else config.read_timeout
    try:
        while True:
            try:
                async with asyncio.timeout(idle_limit):
                    message = await connection.recv()
            except TimeoutError:
                client.close(_INTERNAL_ERROR, "read timeout")
                await connection.wait_closed()
                return
            except ConnectionClosed:
                return
            opened.received(message)
    finally:
        if client._sender is not None:
            client._sender.stop()
        opened.closing()
        opened.closed(connection.close_code, connection.close_reason)


ProcessRequest = Callable[[ServerConnection, Request], Awaitable[Response | None]]


def server_options(hub: SessionHost, *, path: str = "/api/ws") -> dict[str, Any]:
    """Keyword arguments for ``websockets.asyncio.server.serve`` that match ``hub.config``.

    permessage-deflate is negotiated as ``compression`` says, with the parameters that let
    one compressed frame serve every connection (:mod:`wshub.compression`); frame size,
    keepalive, handshake and closing deadlines come from the config, connections are
    :class:`HubServerConnection`, and ``process_request`` answers 404 off ``path`` and applies
    the hub's admission (401 without the credentials it requires, 403 for another browser
    origin, 503 when full or stopping).
    """
    config = hub.config
    heartbeat = config.enable_ping_pong
    return {
        "compression": None,  # websockets' own, per connection; the hub's come next
        "extensions": server_extensions(config.compression),
        "max_size": config.max_message_size,
        "ping_interval": config.ping_interval if heartbeat else None,
        "ping_timeout": config.pong_timeout if heartbeat else None,
        "open_timeout": config.open_timeout,
        "close_timeout": config.write_timeout,
        "create_connection": HubServerConnection,
        "process_request": _process_request(hub, path),
    }


def _process_request(hub: SessionHost, path: str) -> ProcessRequest:
    async def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if urllib.parse.urlsplit(request.path).path != path:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        answer = await admission_of(hub, _handshake_request(request, connection.remote_address))
        if isinstance(answer, Refusal):
            response = connection.respond(HTTPStatus(answer.status), f"{answer.reason}\n")
            for name, value in answer.headers:
                response.headers[name] = value
            return response
        if isinstance(connection, HubServerConnection):
            connection.hub_admission = answer
        return None

    return process_request
