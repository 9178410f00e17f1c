"""In-memory transports: the session port without sockets.

:class:`MemoryTransport` and :class:`CountingTransport` are bare ``write`` targets for driving
the fan-out core alone. :class:`MemoryClient` is a whole
:class:`wshub.session.ClientTransport`: a hub test opens a session on it and reads back the
messages the hub wrote, with no socket in the way.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from wshub.compression import WINDOW_BITS
from wshub.session import (
    ClientSession,
    FrameKind,
    HandshakeRequest,
    Refusal,
    SessionHost,
    admission_of,
)


class MemoryTransport:
    """Records every write (``bytes`` for WebSocket frames, a list for text messages)."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.fail = False

    def write(self, data: Any) -> None:
        if self.fail:
            raise ConnectionResetError("the transport is gone")
        self.written.append(bytes(data) if isinstance(data, bytes) else list(data))


class CountingTransport:
    """Counts bytes and writes only: cheap enough that a benchmark measures the core."""

    def __init__(self) -> None:
        self.writes = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.size += len(data)


def split_frames(data: bytes) -> list[bytes]:
    """The payloads of the unmasked, uncompressed text frames the core writes, in order."""
    frames = read_frames(data)
    assert not any(compressed for compressed, _ in frames), "a compressed frame"
    return [payload for _, payload in frames]


def inflate(body: bytes) -> bytes:
    """A compressed message decoded as a client without context takeover does: with a
    decompressor of its own, knowing nothing of the frames before it."""
    decoder = zlib.decompressobj(-WINDOW_BITS)
    return decoder.decompress(body + b"\x00\x00\xff\xff") + decoder.flush()


def event_data(stream: bytes) -> list[bytes]:
    """The ``data`` of each Server-Sent Events record in ``stream`` (whole records), its
    lines joined by ``\n``, as an EventSource reads them."""
    payloads = []
    for record in stream.split(b"\n\n")[:-1]:
        lines = [line[6:] for line in record.split(b"\n") if line.startswith(b"data: ")]
        payloads.append(b"\n".join(lines))
    return payloads


def read_frames(data: bytes) -> list[tuple[bool, bytes]]:
    """Each unmasked text frame the core writes, in order: whether it is compressed (RSV1)
    and its payload as sent."""
    frames = []
    position = 0
    while position < len(data):
        first = data[position]
        assert first in (0x81, 0xC1), data[position : position + 2]
        length = data[position + 1]
        position += 2
        if length == 126:
            length = int.from_bytes(data[position : position + 2], "big")
            position += 2
        elif length == 127:
            length = int.from_bytes(data[position : position + 8], "big")
            position += 8
        frames.append((first == 0xC1, data[position : position + length]))
        position += length
    return frames


class MemoryClient:
    """A client connected through memory: a :class:`~wshub.session.ClientTransport`.

    Args:
        frame_kind: What the core hands to :meth:`write`.
        target: The handshake's path and query string.
        headers: The handshake's headers (lower-case names).
    """

    def __init__(
        self,
        frame_kind: FrameKind = FrameKind.WEBSOCKET_FRAMES,
        target: str = "/api/ws",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.frame_kind = frame_kind
        self.request = HandshakeRequest.from_target(target, headers or {}, "memory:1")
        self.session: ClientSession | None = None
        self.payloads: list[bytes] = []
        self.close_frame: tuple[int, str] | None = None
        self.aborted = False
        self.writes = 0

    async def open(self, hub: SessionHost) -> ClientSession | Refusal:
        """Ask ``hub`` to admit and take this client, as a transport does."""
        admission = await admission_of(hub, self.request)
        if isinstance(admission, Refusal):
            return admission
        opened = hub.open_session(self, admission)
        if not isinstance(opened, Refusal):
            self.session = opened
        return opened

    def write(self, data: Any) -> None:
        assert self.close_frame is None, "written to after the close began"
        self.writes += 1
        if self.frame_kind is FrameKind.TEXT_MESSAGES:
            self.payloads.extend(data)
        elif self.frame_kind is FrameKind.SSE_EVENTS:
            self.payloads.extend(event_data(data))
        else:  # frames, compressed or not
            for compressed, payload in read_frames(data):
                self.payloads.append(inflate(payload) if compressed else payload)

    def close(self, code: int, reason: str) -> None:
        if self.close_frame is not None:
            return
        self.close_frame = (code, reason)
        if self.session is not None:
            self.session.closing()
            self.session.closed(None, None)  # the peer answered at once

    def abort(self) -> None:
        self.aborted = True

    def buffered_bytes(self) -> int:
        return 0

    def send(self, message: Any) -> None:
        """The client sends ``message`` (JSON-encoded unless it is str or bytes)."""
        assert self.session is not None
        text = message if isinstance(message, str | bytes) else json.dumps(message)
        self.session.received(text)

    def messages(self) -> list[dict[str, Any]]:
        """Every message written so far, decoded, and forget them."""
        decoded = [json.loads(payload) for payload in self.payloads]
        self.payloads = []
        return decoded
