"""Clients that stop reading: bounded buffers, the two policies, and the drain deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .helpers import client, recv_json, send_json, wait_until

PADDING = "x" * 65536  # large frames fill the socket buffers quickly
MAX_PUBLISHES = 3000  # ~200 MB: far more than loopback socket buffers hold


async def flood(hub: Any, until: Any, limit: int = MAX_PUBLISHES) -> int:
    """Publish one large message per loop iteration until ``until()``; returns how many."""
    published = 0
    while not until() and published < limit:
        hub.broadcast_to_all("big", {"n": published, "pad": PADDING})
        published += 1
        await asyncio.sleep(0)
    return published


async def read_all(ws: ClientConnection, kind: str = "big") -> tuple[list[int], Any]:
    """Read a paused client's backlog to the end; returns the ``n`` seen and the close."""
    numbers = []
    try:
        while True:
            message = await recv_json(ws)
            if message["type"] == kind:
                numbers.append(message["data"]["n"])
    except ConnectionClosed as closed:
        return numbers, closed.rcvd


async def read_numbers(ws: ClientConnection, last: int) -> list[int]:
    numbers: list[int] = []
    while not numbers or numbers[-1] != last:
        numbers.append((await recv_json(ws))["data"]["n"])
    return numbers


async def test_overflowing_client_is_closed_with_4008_and_others_get_everything(
    hub_server: Any,
) -> None:
    async with hub_server(client_buffer_size=8, write_timeout=5.0) as served:
        hub = served.hub
        # max_queue=None: the fast client reads everything the socket brings, at once.
        async with (
            client(served.url, max_queue=None) as (fast, _),
            client(served.url) as (
                slow,
                _,
            ),
        ):
            slow.transport.pause_reading()
            published = await flood(
                hub, until=lambda: hub.stats()["slow_consumer_disconnects"] > 0
            )
            assert hub.stats()["slow_consumer_disconnects"] == 1
            assert await read_numbers(fast, published - 1) == list(range(published))

            slow.transport.resume_reading()
            received, close = await read_all(slow)
            assert received == list(range(len(received)))  # a prefix, in order
            assert len(received) < published
            assert close is not None and (close.code, close.reason) == (4008, "slow consumer")
            await wait_until(lambda: hub.client_count == 1)
            assert hub.stats()["drops"] > 0


async def test_drop_oldest_keeps_the_client_and_its_newest_messages(hub_server: Any) -> None:
    cap = 256 * 1024
    async with hub_server(
        slow_client_policy="drop_oldest",
        client_buffer_size=16,
        max_buffered_bytes=cap,
        write_timeout=5.0,
    ) as served:
        hub = served.hub
        async with client(served.url) as (slow, _):
            slow.transport.pause_reading()
            peak = 0

            def dropped_enough() -> bool:
                nonlocal peak
                [info] = hub.client_info()
                peak = max(peak, info["buffered_bytes"])
                return bool(info["messages_dropped"] >= 50)

            published = await flood(hub, until=dropped_enough)
            assert dropped_enough()
            # Hub buffer plus transport buffer stay bounded whatever is published.
            assert peak <= 2 * cap + 64 * 1024
            slow.transport.resume_reading()
            received = await read_numbers(slow, published - 1)
            assert received == sorted(received) and received[-1] == published - 1
            [info] = hub.client_info()
            assert len(received) + info["messages_dropped"] == published
            assert hub.stats()["slow_consumer_disconnects"] == 0
            await send_json(slow, {"type": "ping"})
            assert (await recv_json(slow))["type"] == "pong"


@pytest.mark.parametrize("policy", ["disconnect", "drop_oldest"])
async def test_transport_that_does_not_drain_within_write_timeout_is_closed(
    hub_server: Any, policy: str
) -> None:
    async with hub_server(
        slow_client_policy=policy,
        client_buffer_size=100_000,
        max_buffered_bytes=2**26,
        write_timeout=0.3,
    ) as served:
        hub = served.hub
        async with client(served.url) as (slow, _):
            slow.transport.pause_reading()
            await flood(hub, until=lambda: bool(hub.client_info()[0]["buffered_bytes"] > 2**20))
            await wait_until(lambda: hub.stats()["slow_consumer_disconnects"] == 1)
            await wait_until(lambda: hub.client_count == 0)
            slow.transport.resume_reading()
            received, _ = await read_all(slow)
            assert received == list(range(len(received)))


@pytest.mark.parametrize("policy", ["disconnect", "drop_oldest"])
async def test_a_burst_larger_than_the_buffer_reaches_a_healthy_client_whole(
    hub_server: Any, transport: str, policy: str
) -> None:
    async with hub_server(
        slow_client_policy=policy, client_buffer_size=16, max_buffered_bytes=4096
    ) as served:
        hub = served.hub
        async with client(served.url) as (ws, _):
            for number in range(500):  # one loop iteration, 30 times the buffer
                hub.broadcast_to_all("n", {"n": number})
            if transport != "asgi":
                # The core writes to the socket as the buffer fills.
                assert [(await recv_json(ws))["data"]["n"] for _ in range(500)] == list(range(500))
                stats = hub.stats()
                assert (stats["drops"], stats["slow_consumer_disconnects"]) == (0, 0)
                return
            # An ASGI server sends nothing before the loop turns: past the bounds the burst
            # meets the policy, which says so, never a silent loss.
            if policy == "disconnect":
                received, close = await read_all(ws, "n")
                assert received == list(range(len(received))) and len(received) < 500
                assert close is not None and (close.code, close.reason) == (4008, "slow consumer")
            else:
                received = await read_numbers(ws, 499)
                assert received == sorted(received)
                [info] = hub.client_info()
                assert len(received) + info["messages_dropped"] == 500
