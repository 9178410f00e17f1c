"""permessage-deflate (RFC 7692), compressed once per message and shared by every client.

A WebSocket library compresses for each connection with a context of its own (websockets:
about 64 KiB a connection) and compresses every message once per client, because with
context takeover a message is encoded against what that connection sent before. The hub
answers every offer with ``server_no_context_takeover``: each message is then compressed on
its own, so one compressed frame is valid on every connection that negotiated the same
server window, or a larger one. The core builds that frame once per message, the first time a
recipient of :data:`~wshub.session.FrameKind.DEFLATE_FRAMES` needs it, and shares it as it
shares plain frames. A client that offered nothing, or a window smaller than the hub's, gets
plain frames, which are valid on every connection (RSV1 clear).

What the hub answers an offer (``compression="deflate"``):

- ``server_no_context_takeover``: what makes one frame valid for all.
- ``server_max_window_bits=12``: a 4 KiB window, so a browser inflates each message with a
  4 KiB window instead of 32 KiB. The hub's messages are a few hundred bytes, compressed on
  their own: a larger window would find no longer match in them.
- ``client_no_context_takeover``: what a client sends is compressed message by message too,
  so websockets decompresses it with a decompressor made for the message and dropped after
  it, not a context kept for the connection's life; its output is bounded by
  ``max_message_size`` (a decompression bomb is closed with 1009).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from websockets.extensions import Extension, ServerExtensionFactory
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)

from .session import FrameKind

__all__ = [
    "COMPRESSION_MODES",
    "WINDOW_BITS",
    "SharedDeflate",
    "frame_kind_of",
    "server_extensions",
]

COMPRESSION_MODES = ("off", "deflate")
"""The values of ``compression``."""

WINDOW_BITS = 12
"""The server window the hub compresses with and asks for (``server_max_window_bits``)."""

_LEVEL = 6  # zlib's default: level 9 found no smaller output for the hub's messages
_SYNC_TRAILER = b"\x00\x00\xff\xff"  # what a sync flush ends with; RFC 7692 7.2.1 strips it


class SharedDeflate:
    """Compresses a message's payload on its own: the fan-out's ``deflate``.

    Args:
        min_size: Payloads shorter than this go plain (``compression_min_size``).

    Attributes:
        compressed: Messages compressed so far.
        plain: Messages left plain, too small or not shrinking.
    """

    __slots__ = ("compressed", "min_size", "plain")

    def __init__(self, min_size: int) -> None:
        self.min_size = min_size
        self.compressed = 0
        self.plain = 0

    def __call__(self, payload: bytes) -> bytes | None:
        """The body of the compressed frame of ``payload``, or None to send it plain."""
        if len(payload) < self.min_size:
            self.plain += 1
            return None
        # A compressor per message, as websockets makes one per message without context
        # takeover: nothing of one message can leak into the next one's frame.
        compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, -WINDOW_BITS)
        body = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        body = body.removesuffix(_SYNC_TRAILER)
        if len(body) >= len(payload):
            self.plain += 1
            return None
        self.compressed += 1
        return body


def server_extensions(compression: str) -> list[ServerExtensionFactory] | None:
    """The extensions a WebSocket server offers for ``compression`` ("off": none)."""
    if compression == "off":
        return None
    return [
        ServerPerMessageDeflateFactory(
            server_no_context_takeover=True,
            client_no_context_takeover=True,
            server_max_window_bits=WINDOW_BITS,
        )
    ]


def frame_kind_of(extensions: Sequence[Extension]) -> FrameKind:
    """What a connection whose handshake negotiated ``extensions`` is sent: the shared
    compressed frames when it decodes them, plain frames otherwise."""
    for extension in extensions:
        if (
            isinstance(extension, PerMessageDeflate)
            and extension.local_no_context_takeover
            and extension.local_max_window_bits >= WINDOW_BITS
        ):
            return FrameKind.DEFLATE_FRAMES
    return FrameKind.WEBSOCKET_FRAMES
