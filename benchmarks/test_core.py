"""Micro-benchmarks of the fan-out core alone, for both implementations.

The normal test run executes each once as a smoke test (``--benchmark-disable``); measure for
real with::

    pytest benchmarks --benchmark-enable --benchmark-group-by=func --benchmark-columns=median,ops

Transports are in memory and only count bytes, so these numbers are the core's own cost:
the system calls a real socket adds are measured by ``benchmarks/coalescing.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.memory import CountingTransport

CLIENTS = 1000
BURST = 100
TOPICS = [f"test:{index}" for index in range(20)]
PAYLOAD = {
    "run_id": "run-42",
    "test_name": "eth_call",
    "progress": 0.5,
    "elapsed_s": 30.0,
    "requests_done": 15000,
    "current_rps": 500.0,
    "error_rate": 0.0,
}


@pytest.fixture
def fanout(core: ModuleType) -> Iterator[tuple[Any, list[Any]]]:
    loop = asyncio.new_event_loop()
    fanout = core.Fanout(
        loop,
        client_buffer_size=BURST * 2,
        max_buffered_bytes=2**24,
        policy=core.CONFLATE,  # the hub's default
        flush_interval=0.0,
        on_overflow=lambda client: None,
        on_blocked=lambda client: None,
    )
    transports = [CountingTransport() for _ in range(CLIENTS)]
    clients = [
        core.Client(f"{index:016x}", transport.write) for index, transport in enumerate(transports)
    ]
    for index, client in enumerate(clients):
        fanout.add_client(client)
        topics = [TOPICS[index % 20], TOPICS[(index * 7) % 20], TOPICS[(index * 13) % 20]]
        fanout.subscribe(client, ["*"] if index % 10 == 0 else topics)
    yield fanout, clients
    fanout.close()
    loop.close()


def frame(core: ModuleType, number: int, key: str | None = None) -> Any:
    payload = core.encode_envelope(
        "run_progress", PAYLOAD, "2026-11-25T00:00:00.000Z", f"1-{number}", key=key
    )
    return core.Message(payload, key)


def test_burst_to_all(benchmark: Any, core: ModuleType, fanout: tuple[Any, list[Any]]) -> None:
    """K messages to every client, then one flush: one write per client."""
    hub_fanout, clients = fanout
    bursts: list[int] = []

    def burst() -> None:
        for number in range(BURST):
            hub_fanout.publish_all(frame(core, number))
        hub_fanout.flush()
        bursts.append(1)

    benchmark(burst)
    assert all(client.messages_sent == BURST * len(bursts) for client in clients)
    assert hub_fanout.writes == CLIENTS * len(bursts)  # one write per client per burst


def test_keyed_burst_to_all(
    benchmark: Any, core: ModuleType, fanout: tuple[Any, list[Any]]
) -> None:
    """As test_burst_to_all, with the runner's keyed progress: healthy clients pay nothing
    for conflation, and get every message."""
    hub_fanout, clients = fanout
    bursts: list[int] = []

    def burst() -> None:
        for number in range(BURST):
            hub_fanout.publish_all(frame(core, number, "run:run-42"))
        hub_fanout.flush()
        bursts.append(1)

    benchmark(burst)
    assert all(client.messages_sent == BURST * len(bursts) for client in clients)
    assert hub_fanout.conflations == 0


def test_topic_fanout(benchmark: Any, core: ModuleType, fanout: tuple[Any, list[Any]]) -> None:
    """K messages each to three topics: de-duplication and the index, then one flush."""
    hub_fanout, _ = fanout
    counts: list[int] = []

    def burst() -> None:
        for number in range(BURST):
            topics = TOPICS[number % 20 : number % 20 + 3]
            counts.append(hub_fanout.publish_topics(frame(core, number), topics))
        hub_fanout.flush()

    benchmark(burst)
    assert counts and min(counts) >= CLIENTS // 10  # the wildcard clients at least


def test_subscription_churn(
    benchmark: Any, core: ModuleType, fanout: tuple[Any, list[Any]]
) -> None:
    """Every client subscribes to five topics and unsubscribes again."""
    hub_fanout, clients = fanout
    extra = [f"run:{index}" for index in range(5)]

    def churn() -> None:
        for client in clients:
            hub_fanout.subscribe(client, extra)
        for client in clients:
            hub_fanout.unsubscribe(client, extra)

    benchmark(churn)
    assert not any(topic in hub_fanout.index for topic in extra)
