"""Hostile and broken clients: whatever one sends, the others are served and it gets a clear
answer or a clean close.

Each test attacks a hub over a real socket and asserts outcomes: the attacker's answer or
close code, the victims' messages, the hub's counters. Bounds on time are generous: they
tell a frozen hub from a working one, not a fast machine from a slow one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import sys
import time
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Opcode

import wshub
from wshub import MemoryBackplane, MemoryStream, MessageTooLarge
from wshub.api import start_api
from wshub.limits import (
    MAX_FRAGMENTS,
    MAX_REQUEST_HEAD,
    MAX_REQUEST_HEADERS,
    RateLimit,
    client_address,
    proxy_networks,
)
from wshub.session import HandshakeRequest
from wshub.wire import SHOWN_DEPTH, SHOWN_ITEMS, SHOWN_STRING, shown

from .helpers import TIMEOUT, client, recv_json, send_json, wait_until
from .raw import RawClient, opening_request

PING = json.dumps({"type": "ping"})


async def _tick(hub: wshub.Hub, stop: asyncio.Event) -> None:
    """Publish ``tick`` to topic ``ticks`` every 10 ms until ``stop``: the victims' stream."""
    sequence = 0
    while not stop.is_set():
        hub.broadcast_to_subscribers("tick", sequence, ("ticks",))
        sequence += 1
        await asyncio.sleep(0.01)


async def _pong_after_errors(ws: Any, errors: int) -> list[dict[str, Any]]:
    """Read ``errors`` error envelopes, then send a ping and read its pong: the connection
    lives on."""
    answers = [await recv_json(ws) for _ in range(errors)]
    assert all(answer["type"] == "error" for answer in answers), answers
    await ws.send(PING)
    assert (await recv_json(ws))["type"] == "pong"
    return [answer["error"] for answer in answers]


# Rate limits (every transport)


async def test_a_client_over_its_rate_limit_is_refused_then_closed(hub_server: Any) -> None:
    # A token every 1,000 s: nothing refills during the test, however slow the machine.
    async with (
        hub_server(client_message_rate=0.001, client_message_burst=5) as served,
        client(served.url) as (attacker, _),
        client(served.url) as (victim, _),
    ):
        for _ in range(5):
            await attacker.send(PING)
        assert [(await recv_json(attacker))["type"] for _ in range(5)] == ["pong"] * 5
        await attacker.send(PING)
        refused = await recv_json(attacker)
        assert refused["type"] == "error" and refused["error"]["code"] == 429
        assert "rate limited" in refused["error"]["message"]
        assert refused["error"]["details"] == {"rate": 0.001, "burst": 5}
        for _ in range(4):  # five refusals in a row: as many as the burst
            await attacker.send(PING)
        with pytest.raises(ConnectionClosedError) as closed:
            while True:
                assert (await recv_json(attacker))["error"]["code"] == 429
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "rate limit exceeded")
        assert served.hub.stats()["rate_limited"] == 5
        await victim.send(PING)  # the others' limits are their own
        assert (await recv_json(victim))["type"] == "pong"


async def test_a_resume_costs_more_than_a_ping(hub_server: Any) -> None:
    async with (
        hub_server(client_message_rate=0.001, client_message_burst=7) as served,
        client(served.url) as (ws, hello),
    ):
        served.hub.broadcast_to_all("news", 1)
        assert (await recv_json(ws))["type"] == "news"
        since = {"type": "subscribe", "data": {"topics": ["a"], "since": "0-0"}}
        await send_json(ws, since)  # 5 of the 7 tokens
        assert (await recv_json(ws))["type"] == "subscribed"
        await send_json(ws, since)  # 1 as any message, then 4 more: refused
        refused = await recv_json(ws)
        assert refused["type"] == "error" and refused["error"]["code"] == 429
        await ws.send(PING)  # the last token
        assert (await recv_json(ws))["type"] == "pong"
        await ws.send(PING)
        assert (await recv_json(ws))["error"]["code"] == 429
        assert served.hub.client_info()[0]["subscriptions"] == ["*", "a"]
        assert hello["type"] == "connection"


async def test_no_rate_limit_when_it_is_off(hub_server: Any) -> None:
    async with (
        hub_server(client_message_rate=0, client_message_burst=1) as served,
        client(served.url) as (ws, _),
    ):
        for _ in range(50):
            await ws.send(PING)
        assert [(await recv_json(ws))["type"] for _ in range(50)] == ["pong"] * 50
        assert served.hub.stats()["rate_limited"] == 0


async def test_protocol_pings_count_against_the_rate_limit(lean_server: Any) -> None:
    async with (
        lean_server(client_message_rate=0.001, client_message_burst=3) as served,
        RawClient.connect(served.url) as raw,
    ):
        assert raw.response is not None and raw.response.status_code == 101
        assert (await raw.next_message())["type"] == "connection"
        raw.writer.write(RawClient.frame(Opcode.PING, b"x") * 6)
        assert await raw.close_code() == 1008
        assert served.hub.stats()["rate_limited"] == 3


# Errors never fail (every transport)


async def test_errors_echo_a_bounded_part_of_what_the_client_sent(hub_server: Any) -> None:
    deep: Any = "bottom"
    for _ in range(300):
        deep = [deep]
    async with hub_server() as served, client(served.url) as (ws, _):
        await ws.send(json.dumps({"type": deep}))
        await ws.send(json.dumps({"type": "subscribe", "data": {"topics": {"a": deep}}}))
        await ws.send(json.dumps({"type": "x" * 100_000}))
        await ws.send(json.dumps({"type": "subscribe", "data": {"topics": list(range(50))}}))
        errors = await _pong_after_errors(ws, 4)
    unknown_type, bad_topics, long_type, many_topics = errors
    assert unknown_type["message"] == "unknown message type"
    # SHOWN_DEPTH levels, the details object included.
    assert unknown_type["details"]["type"] == [["..."]]
    assert bad_topics["details"] == {"topics": {"a": ["..."]}}
    assert long_type["details"]["type"] == "x" * SHOWN_STRING + "..."
    assert many_topics["message"] == "topic must be a string"
    assert many_topics["details"] == {"topic": 0}
    assert len(json.dumps(errors)) < 2000


def test_shown_bounds_depth_items_and_strings() -> None:
    assert shown("a" * 100) == "a" * SHOWN_STRING + "..."
    assert shown(list(range(25))) == [*range(SHOWN_ITEMS), "... 15 more"]
    assert shown({str(n): n for n in range(12)}) == {
        **{str(n): n for n in range(SHOWN_ITEMS)},
        "...": "2 more",
    }
    nested: Any = 1
    for _ in range(SHOWN_DEPTH + 2):
        nested = {"k": nested}
    assert json.dumps(shown(nested)).count("{") == SHOWN_DEPTH
    assert shown(2**70) == str(2**70)[:SHOWN_STRING]
    assert shown(object()) == "object"
    assert shown([1.5, None, True]) == [1.5, None, True]


# The opening handshake (the lean server's own HTTP)


async def test_pipelined_requests_get_the_101_first(
    lean_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with lean_server() as served:
        uri = served.url
        async with RawClient.connect(uri, after_request=opening_request(uri)) as raw:
            assert raw.response is not None and raw.response.status_code == 101
            # The second request is read as frames: not a valid one, so a clean 1002.
            assert await raw.close_code() == 1002
        async with client(uri) as (ws, _):  # and the hub serves on
            await ws.send(PING)
            assert (await recv_json(ws))["type"] == "pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_frames_in_the_same_packet_as_the_request_are_read(lean_server: Any) -> None:
    ping = RawClient.frame(Opcode.TEXT, PING.encode())
    async with lean_server() as served, RawClient.connect(served.url, after_request=ping) as raw:
        assert raw.response is not None and raw.response.status_code == 101
        types = [(await raw.next_message())["type"] for _ in range(2)]
        assert types == ["connection", "pong"]


async def test_a_wrong_websocket_version_gets_426_naming_13(lean_server: Any) -> None:
    async with lean_server() as served:
        host, port = served.url.removeprefix("ws://").split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                b"GET /api/ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 8\r\n\r\n"
            )
            async with asyncio.timeout(TIMEOUT):
                answer = await reader.read()
        finally:
            writer.close()
    assert answer.startswith(b"HTTP/1.1 426 ")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer


@pytest.mark.parametrize(
    "head",
    [
        b"GET /api/ws HTTP/1.1\r\nHost: h\r\nX-Padding: " + b"a" * MAX_REQUEST_HEAD,
        b"GET /api/ws HTTP/1.1\r\n"
        + b"".join(b"X-%d: 1\r\n" % n for n in range(MAX_REQUEST_HEADERS + 1))
        + b"\r\n",
    ],
    ids=["large", "many"],
)
async def test_an_oversized_request_head_gets_431(lean_server: Any, head: bytes) -> None:
    async with lean_server() as served:
        host, port = served.url.removeprefix("ws://").split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head)
            async with asyncio.timeout(TIMEOUT):
                answer = await reader.read()
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 431 ")
        async with client(served.url):  # the next handshake is served as usual
            pass


async def test_unfinished_handshakes_are_capped(lean_server: Any) -> None:
    async with lean_server(max_pending_handshakes=2) as served:
        host, port = served.url.removeprefix("ws://").split("/")[0].split(":")
        async with RawClient.connect(served.url) as opened:  # a client: not pending
            assert opened.response is not None and opened.response.status_code == 101
            pending = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
            try:
                # A third is closed at once, while the first two still wait for their
                # requests (open_timeout is 10 s).
                reader, writer = await asyncio.open_connection(host, int(port))
                async with asyncio.timeout(TIMEOUT):
                    assert await reader.read() == b""
                writer.close()
                first_reader, first_writer = pending[0]
                first_writer.write(opening_request(served.url))
                async with asyncio.timeout(TIMEOUT):
                    assert (await first_reader.readline()).startswith(b"HTTP/1.1 101 ")
            finally:
                for _, pending_writer in pending:
                    pending_writer.close()


async def test_stop_does_not_wait_for_a_client_that_never_closes_tcp(lean_server: Any) -> None:
    """The client answers the hub's close frame but never closes its side (websocket-client
    does this): the hub closes the TCP connection itself (RFC 6455 7.1.1), so stop() does
    not wait write_timeout for it."""
    connection = None
    try:
        async with lean_server(write_timeout=60.0) as served:
            connection = RawClient.connect(served.url)
            raw = await connection.__aenter__()
            assert (await raw.next_message())["type"] == "connection"
            answering = asyncio.create_task(raw.close_code(timeout=60.0))
            stopping = time.monotonic()
        assert time.monotonic() - stopping < TIMEOUT
        assert await answering == 1001 and raw.eof
    finally:
        if connection is not None:
            await connection.__aexit__(None, None, None)


# Fragments (the lean server assembles them itself)


async def test_too_many_fragments_close_with_1009(lean_server: Any) -> None:
    async with lean_server() as served, RawClient.connect(served.url) as raw:
        assert (await raw.next_message())["type"] == "connection"
        frames = [RawClient.frame(Opcode.TEXT, b"{", fin=False)]
        frames += [RawClient.frame(Opcode.CONT, b"", fin=False)] * MAX_FRAGMENTS
        raw.writer.write(b"".join(frames))
        assert await raw.close_code() == 1009


async def test_a_message_in_many_fragments_within_the_limit_is_read(lean_server: Any) -> None:
    async with lean_server() as served, RawClient.connect(served.url) as raw:
        assert (await raw.next_message())["type"] == "connection"
        data = PING.encode()
        frames = [RawClient.frame(Opcode.TEXT, data[:1], fin=False)]
        frames += [RawClient.frame(Opcode.CONT, bytes([byte]), fin=False) for byte in data[1:]]
        frames += [RawClient.frame(Opcode.CONT, b"", fin=True)]
        raw.writer.write(b"".join(frames))
        assert (await raw.next_message())["type"] == "pong"


# Keepalive: only the pong that answers the hub's ping counts


async def test_unsolicited_pongs_do_not_keep_a_dead_client_alive(lean_server: Any) -> None:
    async with (
        lean_server(ping_interval=0.2, pong_timeout=0.3, client_message_rate=0) as served,
        RawClient.connect(served.url) as raw,
    ):
        assert (await raw.next_message())["type"] == "connection"
        started = time.monotonic()

        async def pong_forever() -> None:
            while True:
                raw.send(Opcode.PONG, b"")
                await asyncio.sleep(0.05)

        ponging = asyncio.create_task(pong_forever())
        try:
            assert await raw.close_code(timeout=TIMEOUT) == 1011
        finally:
            ponging.cancel()
        assert time.monotonic() - started < TIMEOUT


async def test_a_pong_that_echoes_the_ping_keeps_the_client(lean_server: Any) -> None:
    async with (
        lean_server(ping_interval=0.1, pong_timeout=0.3, client_message_rate=0) as served,
        RawClient.connect(served.url) as raw,
    ):
        assert (await raw.next_message())["type"] == "connection"
        for _ in range(5):  # five rounds, well past pong_timeout in all
            ping = await raw.next_frame()
            assert ping.opcode is Opcode.PING
            raw.send(Opcode.PONG, ping.data)
        assert served.hub.client_count == 1


# Fair reading: one client's flood does not freeze the others


async def test_a_flood_in_one_write_does_not_freeze_the_other_clients(lean_server: Any) -> None:
    """200,000 valid messages in one write (4 MiB): handled READ_BUDGET bytes per loop
    iteration, so the victim's stream goes on meanwhile."""
    flood = RawClient.frame(Opcode.TEXT, b'{"type":"pong"}') * 200_000
    async with (
        lean_server(client_message_rate=0) as served,
        client(served.url) as (victim, _),
        RawClient.connect(served.url + "?topics=quiet") as attacker,
    ):
        hub = served.hub
        assert (await attacker.next_message())["type"] == "connection"
        await send_json(victim, {"type": "subscribe", "data": {"topics": ["ticks"]}})
        assert (await recv_json(victim))["type"] == "subscribed"
        stop = asyncio.Event()
        publisher = asyncio.create_task(_tick(hub, stop))
        try:
            assert (await recv_json(victim))["type"] == "tick"
            attacker.writer.write(flood)
            attacker.send(Opcode.TEXT, PING.encode())  # answered once the flood is handled
            answered = asyncio.create_task(attacker.next_frame(timeout=120))
            gaps = []
            last = time.monotonic()
            while not answered.done():
                assert (await recv_json(victim))["type"] == "tick"
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            assert json.loads(bytes((await answered).data))["type"] == "pong"
        finally:
            stop.set()
            await publisher
    # Handled in one callback, the flood froze every client for seconds on this machine.
    assert max(gaps) < 1.0, max(gaps)


# Sizes: nothing is published that common clients would refuse to receive


@pytest.mark.parametrize("joined", [False, True], ids=["alone", "backplane"])
async def test_a_message_over_max_publish_size_is_refused_everywhere(
    hub_server: Any, joined: bool
) -> None:
    options: dict[str, Any] = {"max_publish_size": 600}
    if joined:
        options["backplane"] = MemoryBackplane(MemoryStream())
    async with hub_server(**options) as served, client(served.url) as (ws, _):
        hub = served.hub
        with pytest.raises(MessageTooLarge, match=r"max_publish_size \(600 bytes\)"):
            hub.broadcast_to_all("big", "x" * 600)
        with pytest.raises(MessageTooLarge):
            hub.broadcast_to_subscribers("big", "x" * 600, "a")
        with pytest.raises(MessageTooLarge):
            await hub.publish("big", "x" * 600)
        await hub.publish("small", "x" * 300)
        assert (await recv_json(ws))["type"] == "small"


# Kernel buffers


def _server_side_send_buffer(client_address: tuple[str, int]) -> int:
    """SO_SNDBUF of this process's socket whose peer is ``client_address``: the hub's end of
    that client's connection, whatever the transport."""
    for name in os.listdir("/proc/self/fd"):
        try:
            candidate = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        with candidate:
            try:
                if candidate.getpeername() != client_address:
                    continue
                if candidate.getsockname() == client_address:
                    continue  # the client's own end
            except OSError:
                continue
            return candidate.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    raise AssertionError(f"no socket of this process is connected to {client_address}")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")
async def test_socket_send_buffer_fixes_the_kernel_buffer(hub_server: Any, transport: str) -> None:
    async with hub_server(socket_send_buffer=32768) as served, client(served.url) as (ws, _):
        size = _server_side_send_buffer(ws.local_address[:2])
    if transport == "asgi":  # the ASGI server owns its sockets: nothing to set
        assert size != 2 * 32768
    else:
        assert size == 2 * 32768  # Linux doubles it for its bookkeeping


# Fuzzing: random frames, valid and not, never hurt the hub

CLIENT_MESSAGES = [
    b'{"type": "ping"}',
    b'{"type": "subscribe", "data": {"topics": ["a", "b"]}}',
    b'{"type": "subscribe", "data": {"topics": ["a"], "since": "0-0"}}',
    b'{"type": "subscribe", "data": {"topics": ["a"], "since": "99999999999999999999-1"}}',
    b'{"type": "unsubscribe", "data": {"topics": ["*"]}}',
    b'{"type": "subscribe", "data": {"topics": [[[[[]]]]], "since": {"a": 1}}}',
    b'{"type": 1e999}',
    b'{"type": ' + b"[" * 300 + b"]" * 300 + b"}",
    b"[" * 1000,
    b"\xff\xfe",
]


def _raw_frame(opcode: int, fin: bool, rsv: int, payload: bytes, mask: bytes | None) -> bytes:
    """Any frame a hostile client can put on the wire, valid or not (no checks at all)."""
    head = bytes([(fin << 7) | (rsv << 4) | opcode])
    length = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head += bytes([mask_bit | length])
    else:
        head += bytes([mask_bit | 126]) + length.to_bytes(2, "big")
    if mask is None:
        return head + payload
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return head + mask + masked


MASKS = st.binary(min_size=4, max_size=4)
FRAMES = st.lists(
    st.one_of(
        # A valid text frame carrying one of the messages above,
        st.builds(
            _raw_frame,
            opcode=st.just(1),
            fin=st.just(True),
            rsv=st.just(0),
            payload=st.sampled_from(CLIENT_MESSAGES),
            mask=MASKS,
        ),
        # any frame at all,
        st.builds(
            _raw_frame,
            opcode=st.sampled_from([0, 1, 2, 8, 9, 10, 3, 11]),
            fin=st.booleans(),
            rsv=st.sampled_from([0, 0, 0, 4]),
            payload=st.one_of(st.binary(max_size=200), st.sampled_from(CLIENT_MESSAGES)),
            mask=st.one_of(MASKS, st.none()),
        ),
        # or bytes that are no frame at all.
        st.binary(max_size=40),
    ),
    max_size=30,
)
# What a client may be closed with for what it sent (1005: the echo of its own close frame
# without a code); never 1011, the hub's own failure.
CLIENT_FAULTS = {None, 1000, 1002, 1005, 1007, 1008, 1009}


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@given(frames=FRAMES)
# Seeded (derandomize): every run tries the same frames, so CI is repeatable; change the
# strategy or max_examples to explore others.
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_random_frames_get_answers_or_a_clean_close(
    implementation: str, frames: list[bytes]
) -> None:
    """Seeded by hypothesis: whatever the frames, no traceback, no 1011, and the hub serves
    the next client."""
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    try:
        asyncio.run(_fuzz(implementation, frames))
    finally:
        logging.getLogger().removeHandler(errors)
    assert not errors.records, [record.getMessage() for record in errors.records]


async def _fuzz(implementation: str, frames: list[bytes]) -> None:
    config = wshub.HubConfig(log_connection_events=False)
    hub = wshub.Hub(config, implementation=implementation)  # type: ignore[arg-type]
    async with wshub.serve(hub, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/ws"
        async with RawClient.connect(url) as raw:
            assert (await raw.next_message())["type"] == "connection"
            raw.writer.write(b"".join(frames))
            # Then the end of the stream: whatever the frames left unfinished, the hub
            # handles what it got and closes.
            raw.end()
            assert await raw.close_code() in CLIENT_FAULTS
        async with client(url) as (ws, _):
            await ws.send(PING)
            assert (await recv_json(ws))["type"] == "pong"


async def test_a_client_that_never_reads_is_dropped_whatever_it_sends(lean_server: Any) -> None:
    """It pings and sends pongs, never reads: its pongs answer none of the hub's pings (it
    never read one), so the keepalive closes it, and the close deadline drops it."""
    async with (
        lean_server(
            ping_interval=0.2, pong_timeout=0.3, write_timeout=0.3, client_message_rate=0
        ) as served,
        RawClient.connect(served.url) as raw,
    ):
        raw.stop_reading()
        started = time.monotonic()

        async def chatter() -> None:
            while True:
                raw.send(Opcode.PING, b"alive")
                raw.send(Opcode.PONG, b"alive")
                await asyncio.sleep(0.01)

        chatting = asyncio.create_task(chatter())
        try:
            await wait_until(lambda: served.hub.client_count == 0)
        finally:
            chatting.cancel()
        assert time.monotonic() - started < TIMEOUT


# Churn: clients that come and go, cleanly or not, leave nothing behind

CHURN_SECONDS = 10.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self")
async def test_churn_leaks_no_memory_and_no_file_descriptors(lean_server: Any) -> None:
    """For CHURN_SECONDS, twenty at a time: clients that subscribe and leave cleanly, that
    drop the connection mid-handshake, after the greeting or mid-frame."""
    async with lean_server(max_clients=1000, client_message_rate=0) as served:
        url = served.url
        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        request = opening_request(url)
        cycles = 0

        async def one(kind: int) -> None:
            if kind == 0:
                async with client(url + "?topics=a,b") as (ws, _):
                    await send_json(ws, {"type": "subscribe", "data": {"topics": ["c"]}})
                    assert (await recv_json(ws))["type"] == "subscribed"
                return
            reader, writer = await asyncio.open_connection(host, int(port))
            if kind == 1:
                writer.write(request[: len(request) // 2])
            else:
                writer.write(request)
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
                if kind == 3:
                    writer.write(RawClient.frame(Opcode.TEXT, PING.encode())[:5])
            await writer.drain()
            writer.transport.abort()

        async def churn() -> None:
            nonlocal cycles
            deadline = time.monotonic() + CHURN_SECONDS
            while time.monotonic() < deadline:
                await asyncio.gather(*(one(n % 4) for n in range(20)))
                cycles += 1

        await churn()  # warm up: the allocator's pools, the loop's structures
        await wait_until(lambda: served.hub.client_count == 0)
        fds, rss = len(os.listdir("/proc/self/fd")), _rss_bytes()
        await churn()
        await wait_until(lambda: served.hub.client_count == 0)
        await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds + 2)
        growth = _rss_bytes() - rss
        assert cycles > 20  # it did churn
        assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {cycles} cycles"
        async with client(url) as (ws, _):  # and serves on
            await ws.send(PING)
            assert (await recv_json(ws))["type"] == "pong"


# A resume read from the backplane holds live messages for the client: a bounded number


class GatedBackplane(MemoryBackplane):
    """A memory backplane whose stored entries are read only once the gate opens, as a slow
    Redis would answer."""

    def __init__(self, stream: MemoryStream) -> None:
        super().__init__(stream)
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()

    async def entries(self, after: str, until: str) -> Any:
        self.reading.set()
        await self.gate.wait()
        return await super().entries(after, until)


async def _beyond_own_history(hub: wshub.Hub) -> str:
    """Publish ``old`` 0, 1, 2 to a hub whose own history holds one message; the id of the
    first: a resume from it is read from the backplane."""
    first = await hub.publish("old", 0)
    for n in (1, 2):
        await hub.publish("old", n)
    return first.id


async def test_a_replay_that_falls_behind_while_it_is_read_closes_with_4008(
    hub_server: Any,
) -> None:
    backplane = GatedBackplane(MemoryStream())
    async with hub_server(backplane=backplane, history_size=1, client_buffer_size=5) as served:
        hub = served.hub
        since = await _beyond_own_history(hub)
        async with connect(f"{served.url}?since={since}") as ws:
            await asyncio.wait_for(backplane.reading.wait(), TIMEOUT)
            for n in range(6):  # one more than the client may have queued
                await hub.publish("live", n)
            backplane.gate.set()
            with pytest.raises(ConnectionClosedError) as closed:
                await recv_json(ws)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4008, "slow consumer")
        assert hub.stats()["slow_consumer_disconnects"] == 1


async def test_a_replay_within_the_bound_gets_everything(hub_server: Any) -> None:
    backplane = GatedBackplane(MemoryStream())
    async with hub_server(backplane=backplane, history_size=1, client_buffer_size=20) as served:
        hub = served.hub
        since = await _beyond_own_history(hub)
        async with connect(f"{served.url}?since={since}") as ws:
            await asyncio.wait_for(backplane.reading.wait(), TIMEOUT)
            for n in range(6):
                await hub.publish("live", n)
            backplane.gate.set()
            hello = await recv_json(ws)
            assert hello["type"] == "connection" and hello["data"]["recovered"] is True
            received = [(await recv_json(ws))["data"] for _ in range(8)]
            assert received == [1, 2, 0, 1, 2, 3, 4, 5]


# Connections per address


async def test_max_connections_per_ip_refuses_the_next_with_429(hub_server: Any) -> None:
    async with hub_server(max_connections_per_ip=2) as served:
        async with client(served.url), client(served.url):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(served.url):
                    pass
            assert refused.value.response.status_code == 429
            assert served.hub.stats()["rejected_connections"] == 1
        await wait_until(lambda: served.hub.client_count == 0)
        async with client(served.url), client(served.url):  # room again
            pass


async def test_forwarded_addresses_count_only_through_trusted_proxies(hub_server: Any) -> None:
    """Behind a trusted proxy (here: the test itself, on 127.0.0.1), each forwarded
    address has its own allowance; a client cannot spoof its way past the limit by adding
    addresses of its own to the left of what the proxy appended."""
    async with hub_server(max_connections_per_ip=1, trusted_proxies=["127.0.0.0/8"]) as served:

        def via_proxy(chain: str) -> Any:
            return client(served.url, additional_headers={"X-Forwarded-For": chain})

        async with via_proxy("203.0.113.7"), via_proxy("198.51.100.1, 203.0.113.8"):
            with pytest.raises(InvalidStatus) as refused:
                # Claims another address, but the proxy appended 203.0.113.7.
                async with via_proxy("192.0.2.99, 203.0.113.7"):
                    pass
            assert refused.value.response.status_code == 429


async def test_forwarded_addresses_from_untrusted_peers_are_ignored(hub_server: Any) -> None:
    first = {"X-Forwarded-For": "203.0.113.7"}
    async with (
        hub_server(max_connections_per_ip=1) as served,
        client(served.url, additional_headers=first),
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with client(served.url, additional_headers={"X-Forwarded-For": "192.0.2.1"}):
                pass
        assert refused.value.response.status_code == 429


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        (
            "192.0.2.5:4000",
            "203.0.113.7",
            "192.0.2.5",
        ),  # not a trusted proxy: its header is ignored
        ("10.0.0.2:4000", None, "10.0.0.2"),
        ("10.0.0.2:4000", "203.0.113.7", "203.0.113.7"),
        ("10.0.0.2:4000", "192.0.2.99, 203.0.113.7, 10.0.0.3", "203.0.113.7"),
        ("10.0.0.2:4000", "10.0.0.9, 10.0.0.3", "10.0.0.9"),  # every hop trusted: the first
        ("10.0.0.2:4000", "not an address", "not an address"),
        ("[::1]:4000", "2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_address_reads_forwarded_for_only_from_trusted_proxies(
    peer: str, forwarded: str | None, expected: str
) -> None:
    headers = [("X-Forwarded-For", forwarded)] if forwarded is not None else []
    request = HandshakeRequest.from_target("/api/ws", headers, peer)
    assert client_address(request, proxy_networks(["10.0.0.0/8", "::1"])) == expected


# File descriptors: the reserve keeps the rest of the process working at the limit


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")
async def test_at_the_descriptor_limit_clients_get_503_and_the_api_answers(
    lean_server: Any,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the server, a handful of clients (two descriptors each here: both ends are
    # in this process), then the reserve.
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 60, hard))
    try:
        async with (
            lean_server(file_descriptor_reserve=30) as served,
            contextlib.AsyncExitStack() as opened,
        ):
            statuses: list[int] = []
            while len(statuses) < 30 and 503 not in statuses:  # well before 30
                raw = await opened.enter_async_context(RawClient.connect(served.url))
                assert raw.response is not None
                statuses.append(raw.response.status_code)
            assert statuses[-1] == 503 and set(statuses[:-1]) == {101}, statuses
            assert len(statuses) >= 3
            # The internal API still accepts and answers.
            api = await start_api(served.hub, "127.0.0.1", 0)
            try:
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(api.url + "/healthz") as answer,
                ):
                    assert answer.status == 200
            finally:
                await api.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# Every attack family, against a hub that streams to a victim meanwhile


async def _ping_flood(url: str) -> None:
    async with RawClient.connect(url + "?topics=quiet") as raw:
        await raw.next_message()
        raw.writer.write(RawClient.frame(Opcode.PING, b"x") * 2000)
        assert await raw.close_code() == 1008  # past the default rate limit


async def _message_flood(url: str) -> None:
    async with RawClient.connect(url + "?topics=quiet") as raw:
        await raw.next_message()
        raw.writer.write(RawClient.frame(Opcode.TEXT, PING.encode()) * 2000)
        assert await raw.close_code() == 1008


async def _deep_nesting(url: str) -> None:
    deep = b'{"type": ' + b"[" * 300 + b"]" * 300 + b"}"
    async with RawClient.connect(url + "?topics=quiet") as raw:
        await raw.next_message()
        raw.send(Opcode.TEXT, deep)
        raw.send(Opcode.TEXT, PING.encode())
        assert (await raw.next_message())["error"]["code"] == 400
        assert (await raw.next_message())["type"] == "pong"


async def _fragment_bomb(url: str) -> None:
    async with RawClient.connect(url + "?topics=quiet") as raw:
        await raw.next_message()
        frames = [RawClient.frame(Opcode.TEXT, b"{", fin=False)]
        frames += [RawClient.frame(Opcode.CONT, b"", fin=False)] * 5000
        raw.writer.write(b"".join(frames))
        assert await raw.close_code() == 1009


async def _oversized_head(url: str) -> None:
    request = opening_request(url)
    head, _, _ = request.partition(b"\r\n\r\n")
    padded = head + b"\r\nX-Padding: " + b"a" * (2 * MAX_REQUEST_HEAD) + b"\r\n\r\n"
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(padded)
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.read()).startswith(b"HTTP/1.1 431 ")
    finally:
        writer.close()


async def _pipelined(url: str) -> None:
    async with RawClient.connect(url, after_request=opening_request(url) * 3) as raw:
        assert raw.response is not None and raw.response.status_code == 101
        assert await raw.close_code() == 1002


async def _unfinished_handshakes(url: str) -> None:
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    request = opening_request(url)
    writers = []
    for _ in range(50):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(request[:20])
        writers.append(writer)
    for writer in writers:
        writer.transport.abort()


ATTACKS = {
    "ping-flood": _ping_flood,
    "message-flood": _message_flood,
    "deep-nesting": _deep_nesting,
    "fragment-bomb": _fragment_bomb,
    "oversized-head": _oversized_head,
    "pipelined-requests": _pipelined,
    "unfinished-handshakes": _unfinished_handshakes,
}


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")
@pytest.mark.parametrize("attack", ATTACKS)
async def test_an_attack_leaves_the_victim_served(
    lean_server: Any, caplog: pytest.LogCaptureFixture, attack: str
) -> None:
    caplog.set_level(logging.WARNING)
    async with lean_server() as served, client(served.url + "?topics=ticks") as (victim, _):
        hub = served.hub
        await wait_until(lambda: hub.client_count == 1)
        fds = len(os.listdir("/proc/self/fd"))
        stop = asyncio.Event()

        async def watch() -> float:
            longest, last = 0.0, time.monotonic()
            while (await recv_json(victim))["type"] == "tick":
                now = time.monotonic()
                longest, last = max(longest, now - last), now
            return longest

        publisher = asyncio.create_task(_tick(hub, stop))
        watcher = asyncio.create_task(watch())
        try:
            await ATTACKS[attack](served.url)
        finally:
            stop.set()
            await publisher
            hub.broadcast_to_subscribers("end", None, ("ticks",))  # the watcher's sentinel
        longest = await watcher
        await wait_until(lambda: hub.client_count == 1)
        await wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds)
    assert longest < 1.0, f"the victim waited {longest:.2f} s"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_messages_sent_during_a_stored_replay_are_charged_once(hub_server: Any) -> None:
    backplane = GatedBackplane(MemoryStream())
    async with hub_server(
        backplane=backplane, history_size=1, client_message_rate=0.001, client_message_burst=4
    ) as served:
        hub = served.hub
        since = await _beyond_own_history(hub)
        async with connect(f"{served.url}?since={since}") as ws:
            await asyncio.wait_for(backplane.reading.wait(), TIMEOUT)
            for _ in range(3):  # held until the replay is sent: three of the four tokens
                await ws.send(PING)
            await wait_until(
                lambda: hub.stats()["rate_limited"] == 0 and backplane.reading.is_set()
            )
            backplane.gate.set()
            assert (await recv_json(ws))["type"] == "connection"
            assert [(await recv_json(ws))["data"] for _ in range(2)] == [1, 2]
            assert [(await recv_json(ws))["type"] for _ in range(3)] == ["pong"] * 3
            await ws.send(PING)  # the fourth token: not spent twice on the three above
            assert (await recv_json(ws))["type"] == "pong"
            await ws.send(PING)
            assert (await recv_json(ws))["error"]["code"] == 429


def test_the_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = RateLimit(2.0, 3, now=100.0)
    assert [bucket.take(1.0, 100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.refusals == 1 and not bucket.exhausted
    assert not bucket.take(5.0, 100.0)  # costs more than it holds
    assert bucket.take(1.0, 100.5)  # half a second: one token back
    assert bucket.refusals == 0
    assert [bucket.take(1.0, 200.0) for _ in range(4)] == [True, True, True, False]  # capped
    for _ in range(2):
        bucket.take(1.0, 200.0)
    assert bucket.exhausted  # refused as many times in a row as its burst
    unlimited = RateLimit(0, 1, now=0.0)
    assert all(unlimited.take(10.0, 0.0) for _ in range(100))
