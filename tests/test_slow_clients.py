"""Clients that stop reading: bounded buffers, the two policies, and the drain deadline."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from wshub.metrics import HubCollector

from .helpers import client, recv_json, send_json, wait_until

# Large frames fill the socket buffers quickly; random, so that compression (on by default)
# leaves them large.
PADDING = base64.b64encode(os.urandom(49152)).decode()
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


async def test_a_published_message_carries_its_key_and_the_runs_events_their_runs(
    hub_server: Any,
) -> None:
    async with hub_server() as served, client(served.url) as (ws, _):
        hub = served.hub
        hub.broadcast_to_all("state", {"n": 1}, key="deploy:eu")
        await hub.publish("event", {"n": 2}, key=None)
        hub.notify_run_progress(
            "r1", "eth_call", 0.5, elapsed_s=1.0, requests_done=5, current_rps=5.0, error_rate=0.0
        )
        hub.notify_run_failed("r1", "eth_call", "node crashed")
        hub.notify_regression({"id": "g1", "run_id": "r1"}, {"id": "r1", "test_name": "eth_call"})
        messages = [await recv_json(ws) for _ in range(5)]
        assert [(m["type"], m.get("key")) for m in messages] == [
            ("state", "deploy:eu"),
            ("event", None),
            ("run_progress", "run:r1"),
            ("run_failed", "run:r1"),
            ("regression_detected", None),
        ]
        for bad, error in (("", ValueError), ("k" * 257, ValueError), (5, TypeError)):
            with pytest.raises(error, match="key"):
                hub.broadcast_to_subscribers("state", None, ["t"], key=bad)
            with pytest.raises(error, match="key"):
                await hub.publish("state", None, key=bad)
        assert hub.stats()["messages_published"] == 5


async def test_conflate_gives_a_slow_client_every_event_and_the_latest_of_every_key(
    hub_server: Any,
) -> None:
    async with hub_server(client_buffer_size=64, write_timeout=10.0) as served:
        hub = served.hub
        assert hub.config.slow_client_policy == "conflate"  # the default
        async with (
            client(served.url, max_queue=None) as (fast, _),
            client(served.url) as (slow, _),
        ):
            slow.transport.pause_reading()
            published = 0
            events: list[int] = []
            latest: dict[str, int] = {}

            def conflated_enough() -> bool:
                infos = {info["id"]: info for info in hub.client_info()}
                return any(info["conflated"] >= 200 for info in infos.values())

            # Progress of three runs, superseding each other per run, and every 25th
            # message an event that must arrive.
            while not conflated_enough() and published < MAX_PUBLISHES:
                if published % 25 == 0:
                    hub.broadcast_to_all("regression", {"n": published, "pad": PADDING})
                    events.append(published)
                else:
                    key = f"run:{published % 3}"
                    hub.broadcast_to_all("progress", {"n": published, "pad": PADDING}, key=key)
                    latest[key] = published
                published += 1
                await asyncio.sleep(0)
            assert conflated_enough(), hub.client_info()
            hub.broadcast_to_all("done", {"n": published})
            assert await read_numbers(fast, published) == list(range(published + 1))

            slow.transport.resume_reading()
            received: list[dict[str, Any]] = []
            while not received or received[-1]["type"] != "done":
                received.append(await recv_json(slow))
            numbers = [message["data"]["n"] for message in received]
            assert numbers == sorted(numbers), "ids, and so numbers, only rise"
            assert [m["data"]["n"] for m in received if m["type"] == "regression"] == events
            last_of = {m["key"]: m["data"]["n"] for m in received if m["type"] == "progress"}
            assert last_of == latest
            info = next(i for i in hub.client_info() if i["conflated"])
            assert len(received) + info["conflated"] == published + 1
            stats = hub.stats()
            assert (stats["slow_consumer_disconnects"], stats["drops"]) == (0, 0)
            assert stats["conflated"] == info["conflated"]
            registry = CollectorRegistry()
            registry.register(HubCollector(hub))
            assert registry.get_sample_value("wshub_conflated_total") == info["conflated"]


async def test_conflate_closes_a_client_with_4008_when_events_alone_overflow(
    hub_server: Any,
) -> None:
    async with hub_server(client_buffer_size=8, write_timeout=10.0) as served:
        hub = served.hub
        async with client(served.url) as (slow, _):
            slow.transport.pause_reading()
            await flood(hub, until=lambda: hub.stats()["slow_consumer_disconnects"] > 0)
            slow.transport.resume_reading()
            received, close = await read_all(slow)
            assert received == list(range(len(received)))
            assert close is not None and (close.code, close.reason) == (4008, "slow consumer")
            assert hub.stats()["conflated"] == 0


@pytest.mark.parametrize("policy", ["conflate", "disconnect", "drop_oldest"])
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


@pytest.mark.parametrize("policy", ["conflate", "disconnect", "drop_oldest"])
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
            # meets the policy, which says so, never a silent loss (these messages have no
            # key: conflate cannot supersede them and disconnects).
            if policy != "drop_oldest":
                received, close = await read_all(ws, "n")
                assert received == list(range(len(received))) and len(received) < 500
                assert close is not None and (close.code, close.reason) == (4008, "slow consumer")
            else:
                received = await read_numbers(ws, 499)
                assert received == sorted(received)
                [info] = hub.client_info()
                assert len(received) + info["messages_dropped"] == 500
