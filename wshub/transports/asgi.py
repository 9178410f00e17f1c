"""The ASGI transport: the hub's endpoint as an ASGI application.

::

    app = Starlette(routes=[WebSocketRoute("/api/ws", wshub.asgi_app(hub))])

or run by an ASGI server directly (``uvicorn.run(wshub.asgi_app(hub))``), in which case the
ASGI lifespan starts and stops the hub. A plain ``GET`` of ``events_path`` (``/api/events``)
is the hub's Server-Sent Events stream (docs/protocol.md), its records sent as
``http.response.body`` messages through a :class:`~.events.SentStream`; other plain HTTP
requests are answered 404. In a framework, route that path to the application too
(Starlette: ``Route("/api/events", app)``).

ASGI servers frame every message themselves, so this transport takes each message's JSON
text (:data:`~wshub.session.FrameKind.TEXT_MESSAGES`) and sends it with one
``websocket.send`` per message per client, through
:class:`~wshub.transports.messages.MessageSender`; that costs a server's whole send path per
delivery, measured in the README's benchmark table. Keepalive pings and the largest frame a
client may send are the ASGI server's settings (uvicorn: ``ws_ping_interval``,
``ws_ping_timeout``, ``ws_max_size``); the hub also refuses messages over
``max_message_size`` (1009).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..session import (
    FrameKind,
    HandshakeRequest,
    Refusal,
    SessionHost,
    admission_of,
    format_address,
)
from .events import EVENTS_PATH, SentStream, close_record, stream_headers
from .messages import MessageSender

__all__ = ["AsgiApp", "asgi_app"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_INTERNAL_ERROR = 1011
_MESSAGE_TOO_BIG = 1009


def _handshake_request(scope: Scope) -> HandshakeRequest:
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope.get("headers", ())
    ]
    query = scope.get("query_string", b"").decode("latin-1")
    target = scope.get("path", "/") + (f"?{query}" if query else "")
    return HandshakeRequest.from_target(target, headers, format_address(scope.get("client")))


class _Client:
    """The :class:`~wshub.session.ClientTransport` of one ASGI WebSocket."""

    frame_kind = FrameKind.TEXT_MESSAGES

    def __init__(self, send: Send, close_timeout: float) -> None:
        self._asgi_send = send
        self.sender = MessageSender(self._send_text, self._close, close_timeout, self._give_up)
        self.write = self.sender.write
        # The deadline of the receive being awaited; brought forward to stop serving.
        self.receiving: asyncio.Timeout | None = None
        self.gone = False
        self.closed_by_hub = asyncio.Event()  # the close is out: ignore what arrives

    def _give_up(self) -> None:
        # The close did not finish in time: return from the application, which makes the
        # server drop the connection.
        self.gone = True
        if self.receiving is not None:
            self.receiving.reschedule(asyncio.get_running_loop().time())

    async def _send_text(self, payload: bytes) -> None:
        await self._asgi_send({"type": "websocket.send", "text": payload.decode()})

    async def _close(self, code: int, reason: str) -> None:
        self.closed_by_hub.set()
        await self._asgi_send({"type": "websocket.close", "code": code, "reason": reason})

    def close(self, code: int, reason: str) -> None:
        self.sender.close(code, reason)

    def abort(self) -> None:
        # ASGI has no abort: stop serving, and the server drops the connection.
        self.sender.stop()
        if self.sender.session is not None:
            self.sender.session.closed(None, None)
        self._give_up()

    def buffered_bytes(self) -> int:
        return self.sender.buffered_bytes()


class AsgiApp:
    """An ASGI application serving the hub's WebSocket endpoint (see :func:`asgi_app`)."""

    def __init__(
        self, hub: Any, *, path: str | None = None, events_path: str | None = EVENTS_PATH
    ) -> None:
        self.hub = hub
        self.path = path
        self.events_path = events_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket" and (self.path is None or scope.get("path") == self.path):
            await self._websocket(scope, receive, send)
        elif (
            kind == "http"
            and self.events_path is not None
            and (scope.get("path") == self.events_path)
        ):
            await self._events(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await _not_found(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                try:
                    await self.hub.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self.hub.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub: SessionHost = self.hub
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        admission = await admission_of(hub, _handshake_request(scope))
        if isinstance(admission, Refusal):
            await _refuse(scope, send, admission)
            return
        await send({"type": "websocket.accept"})
        client = _Client(send, hub.config.write_timeout)
        opened = hub.open_session(client, admission)
        if isinstance(opened, Refusal):
            await send({"type": "websocket.close", "code": opened.close_code})
            return
        client.sender.session = opened
        config = hub.config
        idle_limit = None if config.enable_ping_pong else config.read_timeout
        code: int | None = None
        try:
            while not client.gone:
                try:
                    async with asyncio.timeout(idle_limit) as client.receiving:
                        event = await receive()
                except TimeoutError:
                    if not client.gone:
                        client.close(_INTERNAL_ERROR, "read timeout")
                    continue
                finally:
                    client.receiving = None
                kind = event["type"]
                if kind == "websocket.disconnect":
                    code = event.get("code")
                    return
                if kind != "websocket.receive" or client.closed_by_hub.is_set():
                    continue
                message = event.get("text")
                if message is None:
                    message = event.get("bytes") or b""
                if len(message) > config.max_message_size:
                    client.close(_MESSAGE_TOO_BIG, "message too big")
                    continue
                opened.received(message)
        finally:
            client.sender.stop()
            opened.closing()
            opened.closed(code, None)

    async def _events(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub: SessionHost = self.hub
        if scope.get("method") != "GET":
            await _answer(send, 405, "Method Not Allowed", [(b"allow", b"GET")])
            return
        admission = await admission_of(hub, _handshake_request(scope))
        if isinstance(admission, Refusal):
            headers = [
                (name.lower().encode(), value.encode()) for name, value in admission.headers
            ]
            await _answer(send, admission.status, admission.reason, headers)
            return
        headers = [
            (name.lower().encode(), value.encode()) for name, value in stream_headers(admission)
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        gone = asyncio.Event()  # the client left, or (no abort in ASGI) the hub gave up
        stream = SentStream(body, gone.set, hub.config.write_timeout)
        opened = hub.open_session(stream, admission)
        if isinstance(opened, Refusal):
            await body(close_record(opened.close_code, opened.reason))
            await send({"type": "http.response.body", "body": b""})
            return
        stream.sender.session = opened
        try:
            await _serve_stream(stream, receive, gone, hub.config.ping_interval)
        finally:
            stream.sender.stop()
            opened.closed(None, None)
        if stream.finished and not gone.is_set():  # the hub ended it: end the response
            with contextlib.suppress(Exception):
                async with asyncio.timeout(hub.config.write_timeout):
                    await send({"type": "http.response.body", "body": b""})
        # Else returning with the body unfinished makes the server drop the connection.


async def _serve_stream(
    stream: SentStream, receive: Receive, gone: asyncio.Event, heartbeat: float
) -> None:
    """Until the hub ends the stream or the client leaves: heartbeats every ``heartbeat``
    seconds, and ``receive`` watched for ``http.disconnect``."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watching = asyncio.ensure_future(disconnected())
    ended = asyncio.ensure_future(stream.ended.wait())
    left = asyncio.ensure_future(gone.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {watching, ended, left}, timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                return
            stream.heartbeat()
    finally:
        for task in (watching, ended, left):
            task.cancel()


def asgi_app(
    hub: Any, *, path: str | None = None, events_path: str | None = EVENTS_PATH
) -> AsgiApp:
    """An ASGI application object that serves ``hub``'s WebSocket endpoint and event stream.

    Args:
        hub: The :class:`wshub.Hub`. Run directly by an ASGI server, the application starts
            and stops it with the server's lifespan; mounted in a framework, the framework's
            lifespan must (Starlette: ``on_startup``/``on_shutdown`` or a lifespan function).
        path: Serve only WebSocket connections to this path (others get 404); None serves
            every path it is routed, for a framework's router to choose.
        events_path: The path of the Server-Sent Events stream, for plain ``GET`` requests
            (docs/protocol.md); None serves none.
    """
    return AsgiApp(hub, path=path, events_path=events_path)


async def _answer(send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]]) -> None:
    """A whole plain-text HTTP answer."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": f"{text}\n".encode()})


async def _refuse(scope: Scope, send: Send, refusal: Refusal) -> None:
    """Refuse a handshake with the hub's HTTP status where the server allows it."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = f"{refusal.reason}\n".encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": refusal.status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    *((name.lower().encode(), value.encode()) for name, value in refusal.headers),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # the server answers 403
        await send({"type": "websocket.close", "code": refusal.close_code})


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await _refuse(scope, send, Refusal(404, "Not Found", 1008))
        return
    await _answer(send, 404, "Not Found", [])
