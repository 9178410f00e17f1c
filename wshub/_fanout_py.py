"""The fan-out core in pure Python: the readable specification of ``_fanout.pyx``.

A message flows through this module in one direction::

    encode_envelope()  ->  build_frame()  ->  Fanout.publish_*()  ->  Client.frames
                                                       |
                      one transport.write() per client  <-  Fanout.flush()

The envelope is serialized once and framed once; every recipient gets a reference to the same
``bytes`` object appended to its buffer. Nothing here creates a task or awaits: the flush runs
from ``loop.call_soon`` (or ``call_later`` with a flush interval), so every frame queued for a
client during one event-loop iteration leaves in a single write.

The compiled module mirrors every name and behaviour below; the tests run the same suite against
both and compare their frames byte for byte.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from websockets.protocol import State

__all__ = ["Client", "Fanout", "build_frame", "encode_envelope"]

# Naive datetimes in runner payloads are UTC; RFC 3339 wants the "Z".
JSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS
_OPEN = State.OPEN

_TEXT_FIN = 0x81  # FIN bit set, opcode 1 (text)
_MEDIUM = struct.Struct("!BBH")
_LARGE = struct.Struct("!BBQ")


def encode_envelope(
    message_type: str,
    data: Any,
    timestamp: str,
    message_id: str | None = None,
    client_id: str | None = None,
    error: Any = None,
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
    if client_id is not None:
        envelope["client_id"] = client_id
    if error is not None:
        envelope["error"] = error
    return orjson.dumps(envelope, option=JSON_OPTIONS)


def build_frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in one unmasked, unfragmented WebSocket text frame (RFC 6455 5.2).

    A server never masks, and compression is off on hub connections, so the same frame bytes
    are valid on every one of them.
    """
    length = len(payload)
    if length < 126:
        header = bytes((_TEXT_FIN, length))
    elif length < 65536:
        header = _MEDIUM.pack(_TEXT_FIN, 126, length)
    else:
        header = _LARGE.pack(_TEXT_FIN, 127, length)
    return header + payload


class Client:
    """One connection's place in the fan-out: its subscriptions and its bounded frame buffer.

    ``connection`` is a websockets asyncio connection (or anything with the same ``protocol``,
    ``transport``, ``paused`` and ``send_in_progress`` attributes). The core writes to its
    transport only while the WebSocket is OPEN, the transport is below its high-water mark and
    no fragmented message is being sent; pings, pongs and close frames stay with websockets.
    """

    __slots__ = (
        "blocked",
        "buffered_bytes",
        "client_id",
        "closed",
        "connection",
        "frames",
        "messages_dropped",
        "messages_sent",
        "pending",
        "protocol",
        "stamp",
        "topics",
        "transport",
    )

    def __init__(self, client_id: str, connection: Any) -> None:
        self.client_id: str = client_id
        self.connection: Any = connection
        self.protocol: Any = connection.protocol
        self.transport: Any = connection.transport
        self.topics: set[str] = set()
        self.frames: list[bytes] = []
        self.buffered_bytes: int = 0
        self.messages_sent: int = 0
        self.messages_dropped: int = 0
        # Number of the last publish queued for this client: de-duplicates a message whose
        # topics match several of the client's subscriptions, in O(1) per match.
        self.stamp: int = 0
        self.pending: bool = False  # in Fanout.dirty, waiting for the next flush
        self.blocked: bool = False  # waiting for the transport to drain
        self.closed: bool = False  # overflowed or removed: accepts no more frames


class Fanout:
    """Topic index, per-client bounded buffers and the coalescing flush.

    Args:
        loop: The event loop that runs the flush.
        client_buffer_size: Most frames a client's buffer holds.
        max_buffered_bytes: Most bytes a client's buffer holds; a single frame larger than
            this is still accepted into an empty buffer, so large messages can flow.
        drop_oldest: On overflow, drop the oldest frames (True) or close the client (False).
        flush_interval: 0 flushes at the end of the current loop iteration; more than 0
            coalesces for up to that many seconds.
        on_overflow: Called with a client that overflowed under the "disconnect" policy, after
            the publish that overflowed it has finished.
        on_blocked: Called once with a client whose transport cannot take frames now; call
            :meth:`unblock` when it can.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        client_buffer_size: int,
        max_buffered_bytes: int,
        drop_oldest: bool,
        flush_interval: float,
        on_overflow: Callable[[Client], object],
        on_blocked: Callable[[Client], object],
    ) -> None:
        self.loop = loop
        self.client_buffer_size = client_buffer_size
        self.max_buffered_bytes = max_buffered_bytes
        self.drop_oldest = drop_oldest
        self.flush_interval = flush_interval
        self.on_overflow = on_overflow
        self.on_blocked = on_blocked
        self.clients: dict[str, Client] = {}
        self.index: dict[str, dict[Client, None]] = {}
        self.dirty: list[Client] = []
        self.overflowed: list[Client] = []
        self.flush_handle: asyncio.Handle | None = None
        self.publish_stamp: int = 0
        self.deliveries: int = 0
        self.drops: int = 0
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
        client.frames = []
        client.buffered_bytes = 0

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

    def publish_all(self, frame: bytes) -> int:
        """Queue ``frame`` for every client. Returns how many clients it was queued for."""
        count = 0
        for client in self.clients.values():
            if self._enqueue(client, frame):
                count += 1
        self._after_publish(count)
        return count

    def publish_topics(self, frame: bytes, topics: Iterable[str]) -> int:
        """Queue ``frame`` once for every client subscribed to one of ``topics`` or to ``"*"``.

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
                if self._enqueue(client, frame):
                    count += 1
        for topic in topics:
            subscribers = self.index.get(topic)
            if subscribers is None:
                continue
            for client in subscribers:
                if client.stamp != stamp:
                    client.stamp = stamp
                    if self._enqueue(client, frame):
                        count += 1
        self._after_publish(count)
        return count

    def send(self, client: Client, frame: bytes) -> bool:
        """Queue ``frame`` for one client, behind what is already queued for it.

        Returns:
            False when the client no longer accepts frames.
        """
        queued = self._enqueue(client, frame)
        self._after_publish(1 if queued else 0)
        return queued

    def _enqueue(self, client: Client, frame: bytes) -> bool:
        if client.closed:
            return False
        size = len(frame)
        queued = len(client.frames)
        # Inline test of the common case; _is_full() decides on the rare full path.
        if queued and (
            queued >= self.client_buffer_size
            or client.buffered_bytes + size > self.max_buffered_bytes
        ):
            if not client.blocked:
                # A burst larger than the buffer, to a transport that can take it: write what
                # is queued now rather than treat a healthy client as slow.
                self._write(client)
            if self._is_full(client, size):
                if not self.drop_oldest:
                    self._overflow(client)
                    return False
                self._drop_oldest(client, size)
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
        queued = len(client.frames)
        return queued > 0 and (
            queued >= self.client_buffer_size
            or client.buffered_bytes + incoming > self.max_buffered_bytes
        )

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
        dropped = len(client.frames) + 1
        client.messages_dropped += dropped
        self.drops += dropped
        client.closed = True
        client.frames = []
        client.buffered_bytes = 0
        self.overflowed.append(client)

    def _after_publish(self, count: int) -> None:
        if count and self.flush_handle is None:
            if self.flush_interval > 0:
                self.flush_handle = self.loop.call_later(self.flush_interval, self.flush)
            else:
                self.flush_handle = self.loop.call_soon(self.flush)
        if self.overflowed:
            # Reported after the loops over the topic index, which the callee may change.
            overflowed, self.overflowed = self.overflowed, []
            for client in overflowed:
                self.on_overflow(client)

    # Flushing

    def flush(self) -> None:
        """Write each client's queued frames to its transport in one write."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        dirty, self.dirty = self.dirty, []
        for client in dirty:
            client.pending = False
            self._write(client)

    def unblock(self, client: Client) -> None:
        """Write what ``client`` queued while its transport was blocked, if it can take it."""
        client.blocked = False
        self._write(client)

    def _write(self, client: Client) -> None:
        frames = client.frames
        if client.closed or not frames:
            return
        if client.protocol.state is not _OPEN:
            # The closing handshake has begun: websockets owns the transport now.
            self._discard(client)
            return
        connection = client.connection
        if connection.paused or connection.send_in_progress is not None:
            if not client.blocked:
                client.blocked = True
                self.on_blocked(client)
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            client.transport.write(data)
        except Exception:
            # A transport torn down under us; the connection's handler cleans up.
            self._discard(client)
            return
        client.messages_sent += len(frames)
        self.bytes_sent += len(data)
        self.writes += 1
        client.frames = []
        client.buffered_bytes = 0

    def _discard(self, client: Client) -> None:
        dropped = len(client.frames)
        client.messages_dropped += dropped
        self.drops += dropped
        client.frames = []
        client.buffered_bytes = 0

    def close(self) -> None:
        """Cancel a scheduled flush; queued frames stay where they are."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
