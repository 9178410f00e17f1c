"""The fan-out core in pure Python: the readable specification of ``_fanout.pyx``.

A message flows through this module in one direction::

    encode_envelope()  ->  Message  ->  Fanout.publish_*()  ->  Client.frames
                                                  |
                  one client.write() per client  <-  Fanout.flush()

The envelope is serialized once. A :class:`Message` builds each wire encoding (a *frame kind*)
the first time a recipient of that kind needs it, and every recipient of that kind gets a
reference to the same ``bytes`` object appended to its buffer. Nothing here creates a task or
awaits: the flush runs from ``loop.call_soon`` (or ``call_later`` with a flush interval), so
every frame queued for a client during one event-loop iteration leaves in a single write.

The core knows nothing of WebSocket libraries. A client is a bound ``write`` and a
``writable`` flag that its transport keeps up to date (see :mod:`wshub.session`).

Slow clients. A client whose buffer is full is handled by the fan-out's policy:
:data:`DISCONNECT` gives up on it (``on_overflow``), :data:`DROP_OLDEST` drops its oldest
frames. Under :data:`CONFLATE`, while a client's transport is not writable (it fell behind:
its socket does not drain), a message with a ``key`` supersedes the one with the same key
still queued for it: the older frame leaves the queue (its slot becomes an empty *hole*,
which joins to nothing) and the newer one takes its turn at the end, so the client's stream
stays in id order (a ``since`` resume stays exact) and its queue holds only the latest
message of each key beside the messages without one. Should that still pass the bound
(messages without a key, and keys, alone fill it), the client overflows as under
:data:`DISCONNECT`: nothing is ever dropped unsaid. A writable client's full buffer is
written at once, so buffers fill only while a transport is not writable; keys are indexed
only then, which keeps the common path free of them.

The callback contract. ``write``, ``on_blocked`` and ``on_overflow`` run Python code while
the core is working: ``write`` inside a flush (and inside a publish, when a burst fills a
buffer), the others after the publish or flush that caused them. ``write`` may clear the
client's ``writable`` flag (asyncio transports call ``pause_writing`` from inside
``transport.write``), may raise (the frames it was given are counted as dropped) and may queue
frames with :meth:`Fanout.send`; it must not subscribe, unsubscribe, add or remove clients,
because a publish may be walking the topic index. ``on_blocked`` and ``on_overflow`` run when
no walk is in progress and may do anything.

The compiled module mirrors every name and behaviour below; the tests run the same suite against
both and compare their frames byte for byte.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from .wire import JSON_OPTIONS

__all__ = [
    "CONFLATE",
    "DEFLATE_FRAMES",
    "DISCONNECT",
    "DROP_OLDEST",
    "FRAME_KINDS",
    "POLICIES",
    "SSE_EVENTS",
    "TEXT_MESSAGES",
    "WEBSOCKET_FRAMES",
    "Client",
    "Fanout",
    "Message",
    "build_event",
    "build_frame",
    "encode_envelope",
]

# The frame kinds: the wire encodings the core can build of one message. A client has one.
WEBSOCKET_FRAMES = 0
"""Whole, unmasked WebSocket text frames; a client's queue is joined into one ``bytes`` and
handed to ``write`` in one call (the lean server, websockets' connections, aiohttp)."""
TEXT_MESSAGES = 1
"""The serialized envelopes alone, for transports that frame messages themselves (ASGI); a
client's queue is handed to ``write`` as a ``list`` of ``bytes``, one per message."""
DEFLATE_FRAMES = 2
"""WebSocket text frames compressed with permessage-deflate (RSV1 set), each message on its
own, for clients that negotiated the hub's parameters (:mod:`wshub.compression`): one
compression per message serves all of them. A message the fan-out's ``deflate`` leaves plain
(too small, or it would not shrink) is its :data:`WEBSOCKET_FRAMES` frame, the same object.
Joined and written like :data:`WEBSOCKET_FRAMES`."""
SSE_EVENTS = 3
"""Server-Sent Events records (``id:``, ``event:``, ``data:`` and a blank line,
:func:`build_event`), for clients of an event stream; a client's queue is joined into one
``bytes``, as frames are."""
# The next kind gets the next number here, a branch in Message._build and, if its queue is
# not joined, one in Fanout._write.
FRAME_KINDS = (WEBSOCKET_FRAMES, TEXT_MESSAGES, DEFLATE_FRAMES, SSE_EVENTS)

Deflate = Callable[[bytes], bytes | None]
"""What a fan-out compresses with: a message's payload to the body of its compressed frame
(raw deflate, sync-flushed, the trailing ``00 00 ff ff`` stripped), or None to send it plain."""

# The slow-client policies: what a full buffer does (see the module docstring).
DISCONNECT = 0
"""Give up on the client: its frames are dropped (counted) and ``on_overflow`` is told."""
DROP_OLDEST = 1
"""Drop the oldest frames (counted) to make room."""
CONFLATE = 2
"""While not writable, supersede the queued message with the incoming one's key; a full
buffer then overflows as under :data:`DISCONNECT`."""
POLICIES = (DISCONNECT, DROP_OLDEST, CONFLATE)

# A superseded frame's slot: it joins to nothing, and text queues leave it out.
_HOLE = b""

_TEXT_FIN = 0x81  # FIN bit set, opcode 1 (text)
_RSV1 = 0x40  # "per-message compressed" (RFC 7692 6), on a message's first frame
_MEDIUM = struct.Struct("!BBH")
_LARGE = struct.Struct("!BBQ")


def encode_envelope(
    message_type: str,
    data: Any,
    timestamp: str,
    message_id: str | None = None,
    client_id: str | None = None,
    error: Any = None,
    key: str | None = None,
) -> bytes:
    """Serialize one wire envelope to JSON bytes.

    Keys appear in a fixed order and are absent when their value is ``None``.

    Args:
        message_type: The envelope's ``type``.
        data: Any value orjson can serialize (dataclasses and datetimes included), or None.
        timestamp: RFC 3339 UTC time of the message.
        message_id: The published message's id, or None for direct replies.
        client_id: The recipient's id, for messages addressed to one client.
        error: The ``error`` object of an error envelope.
        key: The published message's conflation key (messages with the same key supersede
            each other), or None.

    Returns:
        The UTF-8 JSON document.

    Raises:
        TypeError: When ``data`` holds something orjson cannot serialize.
    """
    envelope: dict[str, Any] = {"type": message_type}
    if data is not None:
        envelope["data"] = data
    envelope["timestamp"] = timestamp
    if message_id is not None:
        envelope["id"] = message_id
    if key is not None:
        envelope["key"] = key
    if client_id is not None:
        envelope["client_id"] = client_id
    if error is not None:
        envelope["error"] = error
    return orjson.dumps(envelope, option=JSON_OPTIONS)


def build_frame(payload: bytes, compressed: bool = False) -> bytes:
    """Wrap ``payload`` in one unmasked, unfragmented WebSocket text frame (RFC 6455 5.2).

    A server never masks, so the same frame bytes are valid on every connection; with
    ``compressed``, RSV1 is set and ``payload`` is the message compressed on its own, valid on
    every connection that negotiated the parameters it was compressed with.
    """
    first = _TEXT_FIN | _RSV1 if compressed else _TEXT_FIN
    length = len(payload)
    if length < 126:
        header = bytes((first, length))
    elif length < 65536:
        header = _MEDIUM.pack(first, 126, length)
    else:
        header = _LARGE.pack(first, 127, length)
    return header + payload


def build_event(
    payload: bytes, message_type: str | None = None, message_id: str | None = None
) -> bytes:
    """One Server-Sent Events record: ``id: <message_id>``, ``event: <message_type>``, then
    ``payload`` in ``data:`` lines, and the blank line that ends the record (the WHATWG HTML
    standard, "Server-sent events").

    An id or type that is None, or holds a line break (it could not be one line), gets no
    line; a payload with line breaks (JSON from elsewhere may be pretty-printed) takes one
    ``data:`` line per line, which a client joins back with ``\n``.
    """
    head = b""
    if message_id is not None and not _breaks_line(message_id):
        head = b"id: " + message_id.encode() + b"\n"
    if message_type is not None and not _breaks_line(message_type):
        head += b"event: " + message_type.encode() + b"\n"
    if b"\n" in payload or b"\r" in payload:
        lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return head + b"data: " + payload + b"\n\n"


def _breaks_line(text: str) -> bool:
    return "\n" in text or "\r" in text


class Message:
    """One serialized message and the wire encodings built of it so far.

    ``encodings[kind]`` is None until a recipient of that frame kind needs it; then it is
    built once and shared by every recipient of the kind, and by replays of the message.
    ``key``, when not None, lets this message supersede an older one with the same key in a
    slow client's queue under :data:`CONFLATE`. ``message_type`` and ``message_id`` (None for
    a direct reply) head its :data:`SSE_EVENTS` record.
    """

    __slots__ = ("encodings", "key", "message_id", "message_type", "payload")

    def __init__(
        self,
        payload: bytes,
        key: str | None = None,
        message_type: str | None = None,
        message_id: str | None = None,
    ) -> None:
        if not isinstance(payload, bytes):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        for name, value in (
            ("key", key),
            ("message_type", message_type),
            ("message_id", message_id),
        ):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        self.payload: bytes = payload
        self.key: str | None = key
        self.message_type: str | None = message_type
        self.message_id: str | None = message_id
        self.encodings: list[bytes | None] = [None, payload, None, None]

    def encoded(self, kind: int, deflate: Deflate | None = None) -> bytes:
        """The message in frame kind ``kind``, built on first use; :data:`DEFLATE_FRAMES`
        compresses with ``deflate`` (a fan-out's).

        Raises:
            ValueError: ``kind`` is not one of :data:`FRAME_KINDS`, or it is
                :data:`DEFLATE_FRAMES`, not built yet, and ``deflate`` is None.
        """
        if not 0 <= kind < len(self.encodings):
            raise ValueError(f"unknown frame kind {kind!r}")
        encoded = self.encodings[kind]
        if encoded is None:
            encoded = self.encodings[kind] = self._build(kind, deflate)
        return encoded

    def _build(self, kind: int, deflate: Deflate | None) -> bytes:
        # TEXT_MESSAGES is the payload itself, built with the message.
        if kind == WEBSOCKET_FRAMES:
            return build_frame(self.payload)
        if kind == SSE_EVENTS:
            return build_event(self.payload, self.message_type, self.message_id)
        if deflate is None:
            raise ValueError("a compressed frame needs the fan-out's deflate")
        body = deflate(self.payload)
        if body is None:
            return self.encoded(WEBSOCKET_FRAMES)
        if type(body) is not bytes:
            raise TypeError(f"deflate must return bytes or None, got {type(body).__name__}")
        return build_frame(body, compressed=True)


class Client:
    """One client's place in the fan-out: its subscriptions and its bounded frame buffer.

    Args:
        client_id: The client's id.
        write: Takes what :meth:`Fanout.flush` hands over: one ``bytes`` for
            :data:`WEBSOCKET_FRAMES`, :data:`DEFLATE_FRAMES` and :data:`SSE_EVENTS`, a
            ``list`` of ``bytes`` for :data:`TEXT_MESSAGES`.
        kind: The frame kind the client's transport takes.

    ``writable`` is the transport's flag: while it is False the core keeps the client's frames
    (bounded) and tells ``on_blocked`` once; the transport sets it again through the hub, which
    calls :meth:`Fanout.unblock`.
    """

    __slots__ = (
        "blocked",
        "buffered_bytes",
        "client_id",
        "closed",
        "conflated",
        "frames",
        "holes",
        "keys",
        "kind",
        "messages_dropped",
        "messages_sent",
        "pending",
        "stamp",
        "topics",
        "writable",
        "write",
    )

    def __init__(
        self, client_id: str, write: Callable[[Any], object], kind: int = WEBSOCKET_FRAMES
    ) -> None:
        if kind not in FRAME_KINDS:
            raise ValueError(f"unknown frame kind {kind!r}")
        self.client_id: str = client_id
        self.write: Callable[[Any], object] = write
        self.kind: int = kind
        self.writable: bool = True
        self.topics: set[str] = set()
        self.frames: list[bytes] = []
        self.buffered_bytes: int = 0
        self.messages_sent: int = 0
        self.messages_dropped: int = 0
        self.conflated: int = 0  # messages superseded by a newer one with their key
        # Under CONFLATE, while not writable: the key of each keyed frame queued meanwhile,
        # with its index in ``frames`` (None until there is one: most clients never fall
        # behind, and an empty dict costs each of them 64 bytes), and how many slots of
        # ``frames`` are holes.
        self.keys: dict[str, int] | None = None
        self.holes: int = 0
        # Number of the last publish queued for this client: de-duplicates a message whose
        # topics match several of the client's subscriptions, in O(1) per match.
        self.stamp: int = 0
        self.pending: bool = False  # in Fanout.dirty, waiting for the next flush
        self.blocked: bool = False  # not writable: on_blocked was told, unblock() resumes
        self.closed: bool = False  # overflowed, closing or removed: accepts no more frames


class Fanout:
    """Topic index, per-client bounded buffers and the coalescing flush.

    Args:
        loop: The event loop that runs the flush.
        client_buffer_size: Most frames a client's buffer holds.
        max_buffered_bytes: Most bytes a client's buffer holds; a single frame larger than
            this is still accepted into an empty buffer, so large messages can flow.
        policy: What a full buffer does: :data:`DISCONNECT`, :data:`DROP_OLDEST` or
            :data:`CONFLATE`.
        flush_interval: 0 flushes at the end of the current loop iteration; more than 0
            coalesces for up to that many seconds.
        on_overflow: Called with a client that overflowed (under :data:`DISCONNECT` or
            :data:`CONFLATE`), after the publish that overflowed it has finished.
        on_blocked: Called once with a client that had frames to write while it was not
            writable, after the publish or flush that found it so; :meth:`unblock` resumes it.
        deflate: Compresses a message for :data:`DEFLATE_FRAMES` clients, once per message
            (:data:`Deflate`); None when no client may negotiate compression.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        client_buffer_size: int,
        max_buffered_bytes: int,
        policy: int,
        flush_interval: float,
        on_overflow: Callable[[Client], object],
        on_blocked: Callable[[Client], object],
        deflate: Deflate | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown slow-client policy {policy!r}")
        self.loop = loop
        self.client_buffer_size = client_buffer_size
        self.max_buffered_bytes = max_buffered_bytes
        self.policy = policy
        self.flush_interval = flush_interval
        self.on_overflow = on_overflow
        self.on_blocked = on_blocked
        self.deflate = deflate
        self.clients: dict[str, Client] = {}
        self.index: dict[str, dict[Client, None]] = {}
        self.dirty: list[Client] = []
        self.overflowed: list[Client] = []
        self.newly_blocked: list[Client] = []
        self.flush_handle: asyncio.Handle | None = None
        self.publish_stamp: int = 0
        self.deliveries: int = 0
        self.drops: int = 0
        self.conflations: int = 0
        self.bytes_sent: int = 0
        self.writes: int = 0

    # Membership and subscriptions

    def add_client(self, client: Client) -> None:
        """Start delivering to ``client``."""
        self.clients[client.client_id] = client

    def remove_client(self, client: Client) -> None:
        """Stop delivering to ``client`` and forget its subscriptions and buffered frames."""
        self.unsubscribe(client, list(client.topics))
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]
        client.closed = True
        self._empty(client)

    def close_client(self, client: Client) -> None:
        """The client's transport is closing: drop what is queued (counted), accept no more.

        The client keeps its place and subscriptions until :meth:`remove_client`.
        """
        self._discard(client)
        client.closed = True

    def subscribe(self, client: Client, topics: Iterable[str]) -> None:
        """Add ``topics`` to the client's subscriptions; topics it already has are kept once."""
        for topic in topics:
            if topic not in client.topics:
                client.topics.add(topic)
                subscribers = self.index.get(topic)
                if subscribers is None:
                    subscribers = self.index[topic] = {}
                subscribers[client] = None

    def unsubscribe(self, client: Client, topics: Iterable[str]) -> None:
        """Remove ``topics`` from the client's subscriptions; unknown topics are ignored."""
        for topic in topics:
            if topic in client.topics:
                client.topics.discard(topic)
                subscribers = self.index[topic]
                del subscribers[client]
                if not subscribers:
                    del self.index[topic]

    # Publishing

    def publish_all(self, message: Message) -> int:
        """Queue ``message`` for every client. Returns how many clients it was queued for."""
        count = 0
        for client in self.clients.values():
            if self._enqueue(client, message):
                count += 1
        self._after_publish(count)
        return count

    def publish_topics(self, message: Message, topics: Iterable[str]) -> int:
        """Queue ``message`` once for every client subscribed to one of ``topics`` or to ``"*"``.

        Returns:
            How many clients it was queued for.
        """
        self.publish_stamp += 1
        stamp = self.publish_stamp
        count = 0
        wildcard = self.index.get("*")
        if wildcard is not None:
            for client in wildcard:
                client.stamp = stamp
                if self._enqueue(client, message):
                    count += 1
        for topic in topics:
            subscribers = self.index.get(topic)
            if subscribers is None:
                continue
            for client in subscribers:
                if client.stamp != stamp:
                    client.stamp = stamp
                    if self._enqueue(client, message):
                        count += 1
        self._after_publish(count)
        return count

    def send(self, client: Client, message: Message) -> bool:
        """Queue ``message`` for one client, behind what is already queued for it.

        Returns:
            False when the client no longer accepts frames.
        """
        queued = self._enqueue(client, message)
        self._after_publish(1 if queued else 0)
        return queued

    def _enqueue(self, client: Client, message: Message) -> bool:
        if client.closed:
            return False
        # Inline lookup of an encoding already built: the common case costs no call.
        frame = message.encodings[client.kind]
        if frame is None:
            frame = message.encoded(client.kind, self.deflate)
        size = len(frame)
        key = message.key
        # Only a client that is not writable conflates, and only it indexes its keys.
        tracked = key if not client.writable and self.policy == CONFLATE else None
        if tracked is not None:
            self._supersede(client, tracked)
        queued = len(client.frames) - client.holes
        # Inline test of the common case; _is_full() decides on the rare full path.
        if queued and (
            queued >= self.client_buffer_size
            or client.buffered_bytes + size > self.max_buffered_bytes
        ):
            if client.writable:
                # A burst larger than the buffer, to a transport that can take it: write what
                # is queued now rather than treat a healthy client as slow.
                self._write(client)
            if self._is_full(client, size):
                if self.policy != DROP_OLDEST:
                    self._overflow(client)
                    return False
                self._drop_oldest(client, size)
            elif client.closed:  # the write failed or the transport closed meanwhile
                return False
        if tracked is not None:
            if client.keys is None:
                client.keys = {}
            client.keys[tracked] = len(client.frames)
        client.frames.append(frame)
        client.buffered_bytes += size
        self.deliveries += 1
        if not client.pending:
            client.pending = True
            self.dirty.append(client)
        return True

    def _is_full(self, client: Client, incoming: int) -> bool:
        """Whether ``incoming`` more bytes would pass the client's caps (an empty buffer
        always takes one frame, so a message larger than the byte cap still flows)."""
        queued = len(client.frames) - client.holes
        return queued > 0 and (
            queued >= self.client_buffer_size
            or client.buffered_bytes + incoming > self.max_buffered_bytes
        )

    def _supersede(self, client: Client, key: str) -> None:
        """Take the queued frame with ``key``, if any, out of the client's queue (its slot
        becomes a hole)."""
        if client.keys is None:
            return
        index = client.keys.pop(key, None)
        if index is None:
            return
        frames = client.frames
        client.buffered_bytes -= len(frames[index])
        frames[index] = _HOLE
        client.holes += 1
        client.conflated += 1
        self.conflations += 1
        if client.holes > self.client_buffer_size:
            self._compact(client)

    def _compact(self, client: Client) -> None:
        """Leave the holes out of the client's queue, so that it stays within twice its
        bound however long the client is superseded."""
        key_at = {index: key for key, index in (client.keys or {}).items()}
        frames: list[bytes] = []
        keys: dict[str, int] = {}
        for index, frame in enumerate(client.frames):
            if frame:
                key = key_at.get(index)
                if key is not None:
                    keys[key] = len(frames)
                frames.append(frame)
        client.frames = frames
        client.keys = keys
        client.holes = 0

    def _drop_oldest(self, client: Client, incoming: int) -> None:
        frames = client.frames
        queued = len(frames)
        buffered = client.buffered_bytes
        dropped = 0
        while dropped < queued and (
            queued - dropped >= self.client_buffer_size
            or buffered + incoming > self.max_buffered_bytes
        ):
            buffered -= len(frames[dropped])
            dropped += 1
        if dropped:
            del frames[:dropped]
            client.buffered_bytes = buffered
            client.messages_dropped += dropped
            self.drops += dropped

    def _overflow(self, client: Client) -> None:
        dropped = len(client.frames) - client.holes + 1
        client.messages_dropped += dropped
        self.drops += dropped
        client.closed = True
        self._empty(client)
        self.overflowed.append(client)

    def _after_publish(self, count: int) -> None:
        if count and self.flush_handle is None:
            if self.flush_interval > 0:
                self.flush_handle = self.loop.call_later(self.flush_interval, self.flush)
            else:
                self.flush_handle = self.loop.call_soon(self.flush)
        if self.overflowed or self.newly_blocked:
            self._report()

    def _report(self) -> None:
        """Tell the callbacks, after the walks over the topic index, which they may change."""
        if self.newly_blocked:
            blocked, self.newly_blocked = self.newly_blocked, []
            for client in blocked:
                self.on_blocked(client)
        if self.overflowed:
            overflowed, self.overflowed = self.overflowed, []
            for client in overflowed:
                self.on_overflow(client)

    # Flushing

    def flush(self) -> None:
        """Write each client's queued frames with one call of its ``write``."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        dirty, self.dirty = self.dirty, []
        for client in dirty:
            client.pending = False
            self._write(client)
        if self.newly_blocked:
            self._report()

    def unblock(self, client: Client) -> None:
        """The client is writable again: write what it queued meanwhile."""
        client.blocked = False
        self._write(client)
        if self.newly_blocked:
            self._report()

    def _write(self, client: Client) -> None:
        frames = client.frames
        if client.closed or not frames:
            return
        if not client.writable:
            if not client.blocked:
                client.blocked = True
                self.newly_blocked.append(client)
            return
        count = len(frames) - client.holes
        if client.kind != TEXT_MESSAGES:
            # Holes join to nothing.
            data: Any = frames[0] if len(frames) == 1 else b"".join(frames)
            size = len(data)
        else:
            data = [frame for frame in frames if frame] if client.holes else frames
            size = client.buffered_bytes
        # Emptied before the call, which may come back into the core (see the module's
        # callback contract).
        self._empty(client)
        try:
            client.write(data)
        except Exception:
            # A transport torn down under us; its owner reports the close.
            client.messages_dropped += count
            self.drops += count
            return
        client.messages_sent += count
        self.bytes_sent += size
        self.writes += 1

    def _discard(self, client: Client) -> None:
        dropped = len(client.frames) - client.holes
        client.messages_dropped += dropped
        self.drops += dropped
        self._empty(client)

    @staticmethod
    def _empty(client: Client) -> None:
        client.frames = []
        client.buffered_bytes = 0
        if client.keys is not None:
            client.holes = 0
            client.keys = None

    def close(self) -> None:
        """Cancel a scheduled flush; queued frames stay where they are."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
