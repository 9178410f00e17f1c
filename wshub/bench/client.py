"""The benchmark's client side: worker processes full of lean WebSocket readers.

A reader is a bare ``asyncio.Protocol``: it sends the opening handshake itself, then walks
frame headers and skips payloads, counting text frames. Only the first frame of each chunk the
kernel hands over is looked into, for its ``sent_at`` (publish-to-receive latency, the oldest
message of the chunk being the one that waited longest). No JSON decoding, no per-message
objects: the client must cost far less per message than any server it measures, or it would be
what is measured.

The parent drives each worker over a pipe with tuples: ``("connect", host, ports, path,
topics_by_client, source_addresses, slow, node_by_client)``, ``("arm", expected)``,
``("disarm",)``, ``("close",)``, ``("exit",)``; the worker answers ``("connected", opened,
failed, opened_by_node)``, ``("armed",)``, ``("done", last_arrival, received,
latencies_ms_by_node, wire_bytes)`` and ``("closed",)``.

Every client offers permessage-deflate, as browsers do; the frames of a server that accepts
are counted as they come (compressed frames are never inflated), so ``wire_bytes`` (the bytes
of the frames read while armed) shows what compression saves. Their latency cannot be read
without inflating them, and is not sampled. ``ports`` has one port per server node (one,
except with ``--nodes``); latencies are kept per node so that the benchmark can tell those
measured on the publishing node from those that crossed to another.
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import time
from multiprocessing.connection import Connection
from typing import Any

from .channel import Channel

__all__ = ["raise_open_files_limit", "worker_main"]

SENT_AT = b'"sent_at":'
# A wshub hub greets each client first. Its greeting is not a published message: it must not
# be counted even when it arrives after the worker is armed, which a transport that sends
# from a task of its own (ASGI) allows.
GREETING = b'{"type":"connection"'
CONNECT_CONCURRENCY = 128  # handshakes in flight per worker
EVENTS_SUFFIX = "/events"  # a path that names an event stream, not a WebSocket endpoint
OPCODE_TEXT = 0x1
RSV1 = 0x40  # a compressed message's first frame
OPCODE_CLOSE = 0x8
OPCODE_PING = 0x9


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Tally:
    """One worker's counters, shared by its readers."""

    __slots__ = (
        "armed",
        "expected",
        "last_arrival",
        "latencies",
        "nodes",
        "on_done",
        "received",
        "wire_bytes",
    )

    def __init__(self) -> None:
        self.armed = False
        self.expected = 0
        self.received = 0
        self.wire_bytes = 0
        self.last_arrival = 0.0
        self.nodes = 1
        self.latencies: list[list[float]] = [[]]
        self.on_done: Any = None

    def arm(self, expected: int, on_done: Any) -> None:
        self.armed = True
        self.expected = expected
        self.received = 0
        self.wire_bytes = 0
        self.last_arrival = 0.0
        self.latencies = [[] for _ in range(self.nodes)]
        self.on_done = on_done
        if expected == 0:
            self.finish()

    def finish(self) -> None:
        self.armed = False
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done()


class HandshakeReader(asyncio.Protocol):
    """A lean WebSocket client connection: it sends its opening handshake, reads the answer
    (``opened`` gets whether it was accepted), then hands what follows, whole or partial
    frames in ``buffer``, to :meth:`frames_arrived`."""

    __slots__ = ("buffer", "closed", "handshake", "opened", "request", "transport")

    ACCEPTED = b"HTTP/1.1 101"  # the status line of an answer that lets it in

    def __init__(self, request: bytes, opened: asyncio.Future[bool]) -> None:
        self.request = request
        self.opened = opened
        self.buffer = bytearray()
        self.handshake = True
        self.closed = False
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_result(False)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.handshake:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            accepted = buffer.startswith(self.ACCEPTED)
            del buffer[: end + 4]
            self.handshake = False
            if not self.opened.done():
                self.opened.set_result(accepted)
            if not accepted:
                self.transport.close()
                return
        self.frames_arrived()

    def frames_arrived(self) -> None:
        """Bytes after the handshake arrived in ``buffer``."""
        raise NotImplementedError

    def pong(self, payload: bytes) -> None:
        # Client frames are masked (RFC 6455 5.3); a zero mask leaves the payload as it is.
        self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)


def frame_at(buffer: bytearray, position: int) -> tuple[int, int, int] | None:
    """The frame at ``position`` of ``buffer``: its opcode and where its payload starts and
    ends; None when it has not arrived whole. (:class:`Reader` walks frames inline, as this
    does, since a call per frame would weigh on what it measures.)"""
    size = len(buffer)
    if size - position < 2:
        return None
    length = buffer[position + 1] & 0x7F
    header = 2
    if length == 126:
        if size - position < 4:
            return None
        length = (buffer[position + 2] << 8) | buffer[position + 3]
        header = 4
    elif length == 127:
        if size - position < 10:
            return None
        length = int.from_bytes(buffer[position + 2 : position + 10], "big")
        header = 10
    start = position + header
    if start + length > size:
        return None
    return buffer[position] & 0x0F, start, start + length


class Reader(HandshakeReader):
    """One lean WebSocket client connection that counts the frames it receives."""

    __slots__ = ("greeting", "node", "tally")

    def __init__(
        self, request: bytes, tally: Tally, opened: asyncio.Future[bool], node: int = 0
    ) -> None:
        super().__init__(request, opened)
        self.tally = tally
        self.node = node
        self.greeting = True  # the first text frame may be a greeting

    def frames_arrived(self) -> None:
        buffer = self.buffer
        tally = self.tally
        # A compressed frame's text is not there to read: no sample.
        if tally.armed and not (buffer and buffer[0] & RSV1):
            self.sample_latency()
        size = len(buffer)
        position = 0
        frames = 0
        while size - position >= 2:
            opcode = buffer[position] & 0x0F
            length = buffer[position + 1] & 0x7F
            header = 2
            if length == 126:
                if size - position < 4:
                    break
                length = (buffer[position + 2] << 8) | buffer[position + 3]
                header = 4
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 10], "big")
                header = 10
            end = position + header + length
            if end > size:
                break
            if opcode == OPCODE_TEXT:
                if not self.greeting or not self.is_greeting(position + header):
                    frames += 1
                self.greeting = False
            elif opcode == OPCODE_PING:
                self.pong(bytes(buffer[position + header : end]))
            elif opcode == OPCODE_CLOSE:
                self.transport.close()
            position = end
        if position:
            del buffer[:position]
            if tally.armed:
                tally.wire_bytes += position
        if frames and tally.armed:
            tally.received += frames
            tally.last_arrival = time.time()
            if tally.received >= tally.expected:
                tally.finish()

    def is_greeting(self, start: int) -> bool:
        return self.buffer.startswith(GREETING, start)

    def sample_latency(self) -> None:
        """Publish-to-receive time of the oldest message waiting in this chunk.

        Once per chunk, not per frame: the buffer starts at a frame boundary, so the first
        ``sent_at`` in it belongs to the message that waited longest.
        """
        buffer = self.buffer
        start = buffer.find(SENT_AT)
        if start < 0:
            return
        start += len(SENT_AT)
        end = start
        while end < len(buffer) and buffer[end] in b"0123456789.e-+":
            end += 1
        try:
            sent_at = float(buffer[start:end])
        except ValueError:
            return
        self.tally.latencies[self.node].append((time.time() - sent_at) * 1000.0)


class EventStreamReader(Reader):
    """One lean Server-Sent Events client: it counts whole records (the hub's greeting, the
    first one, aside), as :class:`Reader` counts frames."""

    __slots__ = ()

    ACCEPTED = b"HTTP/1.1 200"

    def frames_arrived(self) -> None:
        buffer = self.buffer
        tally = self.tally
        if tally.armed:
            self.sample_latency()
        end = buffer.rfind(b"\n\n")
        if end < 0:
            return
        end += 2
        records = buffer.count(b"\n\n", 0, end)  # JSON holds no line break: one per record
        if self.greeting:
            records -= 1
            self.greeting = False
        del buffer[:end]
        if tally.armed:
            tally.wire_bytes += end
            if records:
                tally.received += records
                tally.last_arrival = time.time()
                if tally.received >= tally.expected:
                    tally.finish()


def stream_request(host: str, port: int, path: str) -> bytes:
    """The request that opens an event stream."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Accept: text/event-stream\r\n"
        "User-Agent: wshub-bench\r\n\r\n"
    ).encode()


def handshake_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        "User-Agent: wshub-bench\r\n\r\n"
    ).encode()


class Worker:
    """The readers of one worker process and the commands that drive them."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.readers: list[Reader] = []

    async def connect(
        self,
        host: str,
        ports: list[int],
        path: str,
        topics: list[str | None],
        sources: list[str],
        slow: list[bool],
        nodes: list[int],
    ) -> tuple[int, int, list[int]]:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
        self.tally.nodes = len(ports)

        async def open_one(index: int) -> Reader | None:
            query = f"?topics={topics[index]}" if topics[index] is not None else ""
            node = nodes[index]
            port = ports[node]
            events = path.endswith(EVENTS_SUFFIX)
            make = stream_request if events else handshake_request
            request = make(host, port, path + query)
            reader_class = EventStreamReader if events else Reader
            opened: asyncio.Future[bool] = loop.create_future()
            source = sources[index % len(sources)]
            async with limit:
                try:
                    _, reader = await loop.create_connection(
                        lambda: reader_class(request, self.tally, opened, node),
                        host,
                        port,
                        local_addr=(source, 0),
                    )
                    accepted = await asyncio.wait_for(opened, 60)
                except (OSError, TimeoutError):
                    return None
            if not accepted:
                return None
            if slow[index]:
                reader.transport.pause_reading()
            return reader

        results = await asyncio.gather(*(open_one(index) for index in range(len(topics))))
        self.readers = [reader for reader in results if reader is not None]
        opened_by_node = [0] * len(ports)
        for reader in self.readers:
            opened_by_node[reader.node] += 1
        return len(self.readers), len(results) - len(self.readers), opened_by_node

    def close(self) -> None:
        for reader in self.readers:
            if not reader.closed:
                reader.transport.abort()
        self.readers = []


async def _serve_commands(pipe: Connection) -> None:
    channel = Channel(pipe, "the benchmark")
    worker = Worker()
    tally = worker.tally
    while True:
        command = await channel.next()
        kind = command[0]
        if kind == "connect":
            opened, failed, opened_by_node = await worker.connect(*command[1:])
            channel.send("connected", opened, failed, opened_by_node)
        elif kind == "arm":
            channel.send("armed")  # before any counted frame can be reported
            tally.arm(
                command[1],
                lambda: channel.send(
                    "done", tally.last_arrival, tally.received, tally.latencies, tally.wire_bytes
                ),
            )
        elif kind == "disarm":
            # The benchmark gave up waiting: report what arrived.
            tally.on_done = None
            tally.armed = False
            channel.send(
                "done", tally.last_arrival, tally.received, tally.latencies, tally.wire_bytes
            )
        elif kind == "close":
            worker.close()
            channel.send("closed")
        else:  # "exit", or "gone": the benchmark went away
            worker.close()
            return


def worker_main(pipe: Connection, loop_name: str) -> None:
    """Entry point of a worker process."""
    raise_open_files_limit()
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(_serve_commands(pipe))
    else:
        asyncio.run(_serve_commands(pipe))
