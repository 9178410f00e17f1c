"""The session port: the one seam between a transport and the hub.

A *transport* owns sockets and the WebSocket protocol (the lean server, websockets'
connections, aiohttp, ASGI). The *hub* owns clients, subscriptions and publishing. They meet
here, and only here::

    transport                                hub (a SessionHost)
    ---------                                -------------------
    handshake request   -- admit() ------->  Admission | Refusal  (stopping, origin,
                                             or an awaitable of it   capacity, who it is)
    handshake done      -- open_session() -> ClientSession | Refusal
    a message arrived   -- received() ---->  replies, subscriptions
    buffer high / low   -- pause_writing() / resume_writing()
    closing handshake   -- closing() ----->  nothing more is written
    connection gone     -- closed() ------>  the client is forgotten

    the core's flush    -- write(data) ---->  bytes (or payloads) onto the wire
    slow client, stop   -- close(code, reason), abort()

The fan-out core holds each client as its transport's bound ``write`` and a ``writable``
flag, which :meth:`ClientSession.pause_writing` and :meth:`ClientSession.resume_writing` keep
up to date; a flush costs one flag read and one call per client. ``write`` receives what the
transport's :attr:`ClientTransport.frame_kind` says (:class:`FrameKind`).

To add a transport, implement :class:`ClientTransport` for one connection and call a
:class:`SessionHost` (a :class:`wshub.Hub`) in this order: :meth:`~SessionHost.admit` before
accepting the handshake, :meth:`~SessionHost.open_session` with its :class:`Admission` once
it is accepted, then the session's methods as events arrive, :meth:`ClientSession.closed`
exactly once at the end. Every method here runs on the hub's event loop, and is synchronous
but for ``admit``, which may answer with an awaitable (an ``authenticate`` hook, a key set).
docs/architecture.md walks through an example.
"""

from __future__ import annotations

import dataclasses
import enum
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the config module imports auth, which imports this port
    from .auth import Principal
    from .config import HubConfig

__all__ = [
    "Admission",
    "ClientSession",
    "ClientTransport",
    "FrameKind",
    "HandshakeRequest",
    "Refusal",
    "SessionHost",
    "admission_of",
    "format_address",
]


class FrameKind(enum.IntEnum):
    """What a transport's ``write`` receives from the fan-out core."""

    WEBSOCKET_FRAMES = 0
    """One ``bytes`` object holding one or more whole, unmasked WebSocket text frames, to be
    written to the socket as they are. For transports that own the socket."""
    TEXT_MESSAGES = 1
    """A ``list`` of ``bytes``, each one message's JSON text, oldest first, for transports
    whose library frames messages itself (ASGI, a websockets connection without the hub's
    connection class)."""
    DEFLATE_FRAMES = 2
    """Like :data:`WEBSOCKET_FRAMES`, for a connection that negotiated the hub's
    permessage-deflate parameters (:func:`wshub.compression.frame_kind_of` says which do):
    a message large enough is one compressed frame (RSV1 set), built once for all of them."""
    SSE_EVENTS = 3
    """One ``bytes`` holding one or more whole Server-Sent Events records (``id:``,
    ``event:``, ``data:``), for a transport that streams ``text/event-stream``, written as
    they are."""


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """What the hub sees of a WebSocket opening handshake.

    Attributes:
        path: The request path, without the query string.
        query: The query string's parameters, each with every value it was given.
        headers: The request headers, names in lower case (repeated headers joined by ", ").
        remote_address: The peer, as ``host:port`` (``[host]:port`` for IPv6).
    """

    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    remote_address: str

    @classmethod
    def from_target(
        cls,
        target: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]],
        remote_address: str,
    ) -> HandshakeRequest:
        """Build one from the request target (path and query string) as sent and the
        headers as ``(name, value)`` pairs or a mapping, in any case."""
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        joined: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        return cls(parts.path, query, joined, remote_address)

    @property
    def origin(self) -> str | None:
        """The ``Origin`` header; browsers always send it, other clients may not."""
        return self.headers.get("origin")

    @property
    def user_agent(self) -> str | None:
        """The ``User-Agent`` header."""
        return self.headers.get("user-agent")


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """The hub will not take a client.

    Attributes:
        status: The HTTP status to answer a handshake with (401, 403, 429, 503).
        reason: For people; the body of that answer and the reason of a close frame.
        close_code: The WebSocket close code for a handshake that was accepted already.
        headers: Headers the answer must carry (``WWW-Authenticate`` with a 401).
    """

    status: int
    reason: str
    close_code: int
    headers: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """A handshake the hub will take: the request, and who its client is.

    Attributes:
        request: The handshake it answers.
        principal: The client's identity and the topics it may subscribe to; when nothing
            authenticates clients, anonymous with every topic.
    """

    request: HandshakeRequest
    principal: Principal


class ClientTransport(Protocol):
    """What the hub needs from a transport for one connected client.

    ``frame_kind`` and ``write`` may be plain attributes: the lean server hands the core its
    asyncio transport's own ``write``, so a flush costs one call per client.
    """

    @property
    def frame_kind(self) -> FrameKind:
        """What ``write`` takes (:class:`FrameKind`); fixed for the connection."""
        ...

    @property
    def write(self) -> Callable[[Any], object]:
        """Puts what the core hands over onto the wire.

        It must not block or await; a transport that cannot take more should take this and
        call :meth:`ClientSession.pause_writing`. It may raise once the connection is gone.
        """
        ...

    def close(self, code: int, reason: str) -> None:
        """Begin the closing handshake with ``code`` and ``reason``; do not wait for it.

        The transport ends the connection within ``write_timeout`` (aborting it if the peer
        does not answer) and then calls :meth:`ClientSession.closed`. Closing a connection
        that is already closing does nothing.
        """
        ...

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""
        ...

    def buffered_bytes(self) -> int:
        """Bytes written and not yet sent (for ``client_info()``)."""
        ...


class ClientSession(Protocol):
    """What the hub offers a transport for one client it took (``open_session``)."""

    @property
    def client_id(self) -> str:
        """The client's id: 16 lowercase hex digits."""
        ...

    def received(self, message: str | bytes) -> None:
        """A whole message arrived: ``str`` from a text frame, ``bytes`` from a binary one.

        Answers (replies, errors) are queued at once; a message the hub cannot handle may
        make it call :meth:`ClientTransport.close`.
        """
        ...

    def control_received(self) -> None:
        """A control frame (ping, pong) arrived: it counts against the client's rate limit
        (``client_message_rate``), which may make the hub close the client. Transports that
        see control frames call it; where the server answers pings by itself, they go
        uncounted."""
        ...

    def pause_writing(self) -> None:
        """The transport cannot take more now: the core keeps the client's frames."""
        ...

    def resume_writing(self) -> None:
        """The transport can take more: the core writes what it kept."""
        ...

    def closing(self) -> None:
        """The closing handshake began (either side) or the connection failed: from now on
        the transport owns the wire, and the core writes nothing more to this client."""
        ...

    def closed(self, code: int | None = None, reason: str | None = None) -> None:
        """The connection ended, with the close code and reason the peer sent (None when it
        sent none). Call it exactly once, also without :meth:`closing`."""
        ...


class SessionHost(Protocol):
    """What a transport needs from the hub (:class:`wshub.Hub` implements it)."""

    @property
    def config(self) -> HubConfig:
        """The settings transports follow: sizes, deadlines, keepalive."""
        ...

    def admit(
        self, request: HandshakeRequest
    ) -> Admission | Refusal | Awaitable[Admission | Refusal]:
        """Whether a handshake may be accepted, and who its client is; or why not.

        The answer comes at once when nothing must be waited for, else as an awaitable
        (an ``authenticate`` hook, a key set fetched over the network): a transport awaits
        it, and the lean server spends a task only then. :func:`admission_of` does both.

        The one admission rule: the hub must be running, a browser's ``Origin`` must be in
        ``allowed_origins``, fewer than ``max_clients`` may be connected, and the client
        must authenticate as the hub requires (a token, an ``authenticate`` hook). It runs
        once per connection.
        """
        ...

    def open_session(
        self, transport: ClientTransport, admission: Admission
    ) -> ClientSession | Refusal:
        """Take a client whose handshake was accepted: greet it and serve it.

        Capacity is checked again (the hub may have filled up or stopped while the
        handshake completed); a :class:`Refusal` then says which close code to send.
        """
        ...


def format_address(address: Any) -> str:
    """``host:port`` (``[host]:port`` for IPv6) of a socket address; other values as text."""
    if isinstance(address, tuple | list) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) if address is not None else ""


async def admission_of(host: SessionHost, request: HandshakeRequest) -> Admission | Refusal:
    """The hub's answer to a handshake, awaited if it must wait: what a transport that runs
    a task per connection anyway calls before it accepts."""
    answer = host.admit(request)
    if isinstance(answer, Admission | Refusal):
        return answer
    return await answer
