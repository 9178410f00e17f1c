"""A WebSocket client that sends exactly what a test tells it to, as an attacker would.

websockets' sans-I/O ``ClientProtocol`` writes the opening request and parses what the hub
sends; nothing it would answer by itself (pongs, the closing handshake) is ever sent. Frames
go out as the test builds them: unsolicited pongs, thousands of fragments, floods in one
write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.extensions import ClientExtensionFactory
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from .helpers import TIMEOUT


def opening_request(url: str) -> bytes:
    """The bytes of a valid opening request for ``url``."""
    protocol = ClientProtocol(parse_uri(url))
    protocol.send_request(protocol.connect())
    return b"".join(protocol.data_to_send())


class RawClient:
    """One TCP connection to the hub, upgraded; see the module's docstring."""

    def __init__(
        self,
        protocol: ClientProtocol,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.protocol = protocol
        self.reader = reader
        self.writer = writer
        self.response: Response | None = None
        self.frames: list[Frame] = []  # received, not taken yet
        self.wire = bytearray()  # every byte received, as it came
        self.eof = False
        self.ended = False  # this side ended its stream: nothing more can be sent

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        after_request: bytes = b"",
        extensions: Sequence[ClientExtensionFactory] | None = None,
    ) -> AsyncIterator[RawClient]:
        """Open ``url``, send the request (and ``after_request`` in the same write), read the
        response; the connection is dropped when the block ends. ``extensions`` are offered,
        and decode what the hub sends (``wire`` keeps it as sent)."""
        uri = parse_uri(url)
        protocol = ClientProtocol(uri, extensions=extensions, max_size=None)
        protocol.send_request(protocol.connect())
        reader, writer = await asyncio.open_connection(uri.host, uri.port)
        try:
            client = cls(protocol, reader, writer)
            writer.write(b"".join(protocol.data_to_send()) + after_request)
            async with asyncio.timeout(TIMEOUT):
                while client.response is None and not client.eof:
                    await client._read()
            yield client
        finally:
            writer.transport.abort()

    def stop_reading(self) -> None:
        """Read nothing more: what the hub sends piles up in the kernel, then in the hub."""
        cast(asyncio.Transport, self.writer.transport).pause_reading()

    def end(self) -> None:
        """End this side of the TCP stream (a half-close); reading goes on."""
        self.writer.write_eof()
        self.ended = True

    def send(
        self, opcode: Opcode, data: bytes | bytearray | memoryview = b"", *, fin: bool = True
    ) -> None:
        """Queue one masked frame, as built here, whatever the protocol thinks of it."""
        self.writer.write(self.frame(opcode, data, fin=fin))

    @staticmethod
    def frame(
        opcode: Opcode, data: bytes | bytearray | memoryview = b"", *, fin: bool = True
    ) -> bytes:
        """The bytes of one masked client frame."""
        return Frame(opcode, bytes(data), fin).serialize(mask=True)

    async def next_frame(self, timeout: float = TIMEOUT) -> Frame:
        """The next frame from the hub; fails the test after ``timeout`` or at the end of
        the stream."""
        async with asyncio.timeout(timeout):
            while not self.frames:
                if self.eof:
                    raise AssertionError("the hub closed the connection")
                await self._read()
        return self.frames.pop(0)

    async def next_message(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next frame from the hub, a text message, decoded."""
        frame = await self.next_frame(timeout)
        assert frame.opcode is Opcode.TEXT, frame
        message: dict[str, Any] = json.loads(bytes(frame.data))
        return message

    async def close_code(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the hub ends the TCP connection; the code of its close frame (None if
        it sent none), which is answered as the closing handshake wants."""
        code = None
        async with asyncio.timeout(timeout):
            while not self.eof or self.frames:
                if not self.frames:
                    await self._read()
                    continue
                frame = self.frames.pop(0)
                if frame.opcode is Opcode.CLOSE and code is None:
                    code = Close.parse(frame.data).code
                    if not self.ended:
                        with contextlib.suppress(ConnectionError):
                            self.send(Opcode.CLOSE, frame.data[:2])
        return code

    async def _read(self) -> None:
        try:
            data = await self.reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            self.protocol.receive_eof()
        else:
            self.wire += data
            self.protocol.receive_data(data)
        self.protocol.data_to_send()  # what it would answer: never sent
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                self.response = event
            elif isinstance(event, Frame):
                self.frames.append(event)
