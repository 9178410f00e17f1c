"""In-memory stand-ins for a websockets connection, for driving the fan-out core alone.

They carry exactly the attributes the core reads (``protocol.state``, ``transport.write``,
``paused``, ``send_in_progress``), so a test or benchmark can watch every byte the core writes
without sockets in the way.
"""

from __future__ import annotations

from typing import Any

from websockets.protocol import State


class MemoryTransport:
    """Records every write."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))


class CountingTransport:
    """Counts bytes and writes only: cheap enough that a benchmark measures the core."""

    def __init__(self) -> None:
        self.writes = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.size += len(data)


class MemoryProtocol:
    def __init__(self) -> None:
        self.state = State.OPEN


class MemoryConnection:
    """What the core reads from a websockets connection."""

    def __init__(self, transport: Any = None) -> None:
        self.protocol = MemoryProtocol()
        self.transport = transport if transport is not None else MemoryTransport()
        self.paused = False
        self.send_in_progress: Any = None
