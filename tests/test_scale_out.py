"""Hubs joined through Redis as they are deployed: ``wshub serve --redis-url`` processes
(and ``--workers``), a real redis-server, clients over real sockets, publishes over HTTP.

test_backplane.py covers the same behaviour with hubs inside the test's process; here every
hub is a process of its own, so what is tested is the command line, the settings, the
internal API and the signals as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from wshub.bench.redis_server import RedisServer
from wshub.publisher import Publisher
from wshub.redis_backplane import COMMAND_TIMEOUT, PROBE_INTERVAL

from .helpers import client, recv_json, send_json
from .processes import ApiError, HubProcess
from .test_resume import nothing_more

# The hubs run in processes of their own, on uvloop; the test's loop only drives clients,
# so running every test under both loops would test nothing more, twice as slowly.
pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])

DEADLINE = 15.0  # longest wait for a state change, such as a hub seeing Redis come back
END = "end"  # the last message of a test's publishes: everything before it has arrived

StartHubs = Callable[..., Awaitable[list[HubProcess]]]


@pytest.fixture
def start_hubs(redis_server: RedisServer) -> Iterator[StartHubs]:
    """``await start_hubs(count, *arguments)``: hub processes on the test's Redis, all stopped
    when the test ends (before the Redis, which this fixture needs)."""
    started: list[HubProcess] = []

    async def start(count: int, *arguments: str) -> list[HubProcess]:
        extra = ["--redis-url", redis_server.url, "--no-log-connection-events", *arguments]
        # In threads: each waits for its process's log, and they start side by side.
        results = await asyncio.gather(
            *(asyncio.to_thread(HubProcess, extra=extra) for _ in range(count)),
            return_exceptions=True,
        )
        hubs = [result for result in results if isinstance(result, HubProcess)]
        started.extend(hubs)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return hubs

    try:
        yield start
    finally:
        for hub in started:
            hub.stop()


async def publish(
    hub: HubProcess, message_type: str, data: Any = None, topics: Sequence[str] | None = None
) -> str:
    """Publish through the hub's API without blocking the clients' loop; the message's id."""
    answer = await asyncio.to_thread(hub.publish, message_type, data, topics)
    message_id: str = answer["id"]
    return message_id


async def eventually(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Wait until ``check()`` (a blocking call, run in a thread) holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.02)


async def until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    """The published messages up to the END marker (excluded); replies fail the test."""
    messages = []
    while (message := await recv_json(ws))["type"] != END:
        assert "id" in message, message
        messages.append(message)
    return messages


def key(message_id: str) -> tuple[int, int]:
    milliseconds, sequence = message_id.split("-")
    return int(milliseconds), int(sequence)


def assert_increasing(ids: Sequence[str]) -> None:
    keys = [key(message_id) for message_id in ids]
    assert keys == sorted(set(keys)), ids


@contextlib.asynccontextmanager
async def clients(urls: Sequence[str]) -> AsyncIterator[list[ClientConnection]]:
    """Connected clients, one per URL, each past its greeting."""
    async with contextlib.AsyncExitStack() as stack:
        connected = [(await stack.enter_async_context(client(url)))[0] for url in urls]
        yield connected


def ws_url(hub: HubProcess, query: str = "") -> str:
    return f"ws://127.0.0.1:{hub.port}/api/ws{query}"


TOPICS: list[list[str] | None] = [None, ["a"], ["b"], ["a", "b"], ["c"]]


def reaches(topics: list[str] | None, subscribed: set[str] | None) -> bool:
    """Whether a message published to ``topics`` (None: everyone) reaches a client holding
    ``subscribed`` (None: the default, ``*``)."""
    return topics is None or subscribed is None or bool(subscribed.intersection(topics))


@pytest.mark.parametrize("count", [2, 3])
async def test_every_client_on_every_node_gets_each_message_once_in_one_order(
    start_hubs: StartHubs, count: int
) -> None:
    hubs = await start_hubs(count)
    subscriptions = {"": None, "?topics=a": {"a"}, "?topics=b,c": {"b", "c"}}
    urls = [ws_url(hub, query) for hub in hubs for query in subscriptions]
    async with clients(urls) as sockets:
        # Through every node at once: the order is Redis's, not any one node's.
        ids = await asyncio.gather(
            *(
                publish(hubs[n % count], "m", n, TOPICS[n % len(TOPICS)])
                for n in range(4 * len(TOPICS) * count)
            )
        )
        await publish(hubs[-1], END)
        received = {}
        for url, ws in zip(urls, sockets, strict=True):
            received[url] = [(m["id"], m["data"]) for m in await until_end(ws)]
        # Every id a publish answered with, once, in the order of the ids.
        everything = received[urls[0]]
        assert sorted(message_id for message_id, _ in everything) == sorted(ids)
        assert_increasing([message_id for message_id, _ in everything])
        for url, messages in received.items():
            query = url.partition("/api/ws")[2]
            wanted = subscriptions[query]
            expected = [
                (message_id, n)
                for message_id, n in everything
                if reaches(TOPICS[n % len(TOPICS)], wanted)
            ]
            assert messages == expected, url
        for ws in sockets:
            await nothing_more(ws)


async def test_resume_on_another_node_while_publishing_goes_on(start_hubs: StartHubs) -> None:
    first, second = await start_hubs(2)
    async with client(ws_url(first, "?topics=a")) as (ws, _):
        for n in range(3):
            await publish(first, "m", n, ["a"])
        seen = [message["id"] for message in await until_count(ws, 3)]
    last_seen = seen[-1]
    sent: list[tuple[int, str]] = []  # (n, topic) in the order the API answered
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        n = 3
        while not stop.is_set():
            topic = "a" if n % 3 else "b"
            await publish((first, second)[n % 2], "m", n, [topic])
            sent.append((n, topic))
            n += 1

    publisher = asyncio.create_task(keep_publishing())
    try:
        await wait_for_count(sent, 10)
        async with client(ws_url(second, f"?topics=a&since={last_seen}")) as (ws, hello):
            assert hello["data"]["recovered"] is True, hello
            await wait_for_count(sent, 30)
            stop.set()
            await publisher
            await publish(first, END, None, ["a"])
            messages = await until_end(ws)
    finally:
        stop.set()
        await publisher
    # The missed ones, then live ones: every "a" message after last_seen, no gap, no repeat.
    assert [message["data"] for message in messages] == [n for n, topic in sent if topic == "a"]
    assert_increasing([last_seen, *(message["id"] for message in messages)])


async def test_a_key_crosses_redis_to_every_node_and_into_replays(start_hubs: StartHubs) -> None:
    first, second = await start_hubs(2)
    async with client(ws_url(second, "?topics=a")) as (ws, _):
        marker = await publish(first, "marker", None, ["a"])
        await asyncio.to_thread(first.publish, "state", {"n": 1}, ["a"], "run:1")
        await asyncio.to_thread(first.publish, "event", {"n": 2}, ["a"])
        live = await until_count(ws, 3)
    assert [(m["type"], m.get("key")) for m in live] == [
        ("marker", None),
        ("state", "run:1"),
        ("event", None),
    ]
    # A node started now holds none of them: its replay comes from Redis, keys and all.
    [third] = await start_hubs(1)
    async with client(ws_url(third, f"?topics=a&since={marker}")) as (ws, hello):
        assert hello["data"]["recovered"] is True, hello
        await publish(first, END, None, ["a"])
        replayed = await until_end(ws)
    assert [(m["type"], m.get("key")) for m in replayed] == [("state", "run:1"), ("event", None)]


async def test_the_state_survives_every_node_restarting(start_hubs: StartHubs) -> None:
    """Redis retains the latest of every key and the recent events beside the stream: a node
    started after the one that delivered them stopped shows them to a client that asks."""
    [first] = await start_hubs(1)
    await asyncio.to_thread(first.publish, "run_progress", 1, ["test:a"], "run:1")
    await asyncio.to_thread(first.publish, "regression_detected", "r", ["test:a"])
    await asyncio.to_thread(first.publish, "run_progress", 2, ["test:a"], "run:1")
    await asyncio.to_thread(first.publish, "run_progress", 7, ["test:b"], "run:2")
    await asyncio.to_thread(first.publish, "run_complete", 3, ["test:a"], "run:1")
    first.stop()
    [second] = await start_hubs(1)
    async with client(ws_url(second, "?topics=test:a&snapshot=1")) as (ws, hello):
        assert hello["data"]["snapshot_messages"] == 2, hello
        shown = await until_count(ws, 2)
        assert [(m["type"], m["data"], m.get("key")) for m in shown] == [
            ("regression_detected", "r", None),
            ("run_complete", 3, "run:1"),
        ]
        await nothing_more(ws)
        # Then live, from another node too.
        [third] = await start_hubs(1)
        await publish(third, "run_progress", 1, ["test:a"])
        [live] = await until_count(ws, 1)
        assert live["type"] == "run_progress"


async def test_a_runner_asking_one_node_counts_the_watchers_of_every_node(
    start_hubs: StartHubs,
) -> None:
    first, second = await start_hubs(2)
    publisher = Publisher(first.api)
    async with clients([ws_url(first, "?topics=run:7"), ws_url(second, "?topics=run:7,*")]):
        await eventually(lambda: publisher.watchers("run:7") == 2, "two watchers of run:7")
        await eventually(lambda: publisher.watchers("run:8") == 1, "the * client watches run:8")
    # Gone from both nodes; the second node's report says so within a second.
    await eventually(lambda: publisher.watchers("run:7") == 0, "nobody watches run:7")


async def until_count(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    messages = [await recv_json(ws) for _ in range(count)]
    assert all("id" in message for message in messages), messages
    return messages


async def wait_for_count(items: list[Any], count: int) -> None:
    async with asyncio.timeout(DEADLINE):
        while len(items) < count:
            await asyncio.sleep(0.01)


async def readiness(hub: HubProcess, status: int, timeout: float = DEADLINE) -> None:
    await eventually(lambda: hub.ready() == status, f"{hub.api}/readyz answers {status}", timeout)


async def ping(ws: ClientConnection) -> None:
    await send_json(ws, {"type": "ping"})
    assert (await recv_json(ws))["type"] == "pong"


async def test_redis_outage_keeps_clients_refuses_publishes_and_recovers(
    start_hubs: StartHubs, redis_server: RedisServer
) -> None:
    hubs = await start_hubs(2)
    async with clients([ws_url(hub) for hub in hubs]) as sockets:
        before = await publish(hubs[0], "m", "before")
        for ws in sockets:
            assert (await recv_json(ws))["id"] == before
        redis_server.kill()
        for hub in hubs:
            await readiness(hub, 503)
            with pytest.raises(ApiError) as refused:
                await publish(hub, "m", "lost")
            assert refused.value.status == 503, refused.value.answer
        for ws in sockets:
            await ping(ws)
        redis_server.restart()
        for hub in hubs:
            await readiness(hub, 200)
        after = await publish(hubs[1], "m", "after")
        for ws in sockets:
            message = await recv_json(ws)  # not "lost": nothing refused was published
            assert (message["id"], message["data"]) == (after, "after")
    # Redis kept the stream in its append-only file: a resume from before the crash works.
    async with client(ws_url(hubs[1], f"?since={before}")) as (ws, hello):
        assert hello["data"]["recovered"] is True, hello
        [message] = await until_count(ws, 1)
        assert message["id"] == after


# Faults. A probe notices a frozen Redis within PROBE_INTERVAL + COMMAND_TIMEOUT; /readyz is
# polled from a thread, so the detection time below includes one poll.
DETECTION = PROBE_INTERVAL + COMMAND_TIMEOUT + 1.0


async def unready_within(hubs: Sequence[HubProcess], seconds: float) -> float:
    """Wait until every hub's /readyz answers 503; fail after ``seconds``. How long it took."""
    started = time.monotonic()
    for hub in hubs:
        await readiness(hub, 503, seconds - (time.monotonic() - started))
    return time.monotonic() - started


async def stays_unready(hubs: Sequence[HubProcess], until: float) -> int:
    """Poll every hub's /readyz until ``until`` (time.monotonic()); each must answer 503."""
    polls = 0
    while time.monotonic() < until:
        for hub in hubs:
            assert await asyncio.to_thread(hub.ready) == 503, hub.api
            polls += 1
    return polls


def backplane_stats(hub: HubProcess) -> dict[str, Any]:
    stats: dict[str, Any] = hub.stats()["backplane"]
    return stats


async def test_every_node_is_unready_through_a_freeze_and_a_kill_and_says_so_once(
    start_hubs: StartHubs, redis_server: RedisServer
) -> None:
    hubs = await start_hubs(3)
    async with clients([ws_url(hub) for hub in hubs]) as sockets:
        redis_server.freeze()
        await unready_within(hubs, DETECTION)
        # Past the reader's 6 s socket timeout: its retries fail inside the freeze too.
        assert await stays_unready(hubs, time.monotonic() + 8.0) > 0
        for ws in sockets:
            await ping(ws)
        redis_server.thaw()
        for hub in hubs:
            await readiness(hub, 200)
        redis_server.kill()
        await unready_within(hubs, DETECTION)
        await stays_unready(hubs, time.monotonic() + 3.0)
        redis_server.restart()
        for hub in hubs:
            await readiness(hub, 200)
        after = await publish(hubs[0], "m", "after")
        for ws in sockets:
            assert (await recv_json(ws))["id"] == after
    for hub in hubs:
        stats = await asyncio.to_thread(backplane_stats, hub)
        assert (stats["disconnects"], stats["reconnects"]) == (2, 2), stats
        # With the backoff doubling from 50 ms to 5 s: a handful of retries per outage,
        # not one every 50 ms.
        assert stats["reconnect_attempts"] <= 16, stats
        assert hub.output.count("is unreachable (") == 2, hub.output
        assert hub.output.count("is reachable again") == 2, hub.output


async def test_a_publisher_delivers_exactly_once_through_a_redis_freeze_and_a_kill(
    start_hubs: StartHubs, redis_server: RedisServer
) -> None:
    first, second = await start_hubs(2)
    publisher = Publisher(first.api, retry_for=60.0)
    stop = threading.Event()
    sent: list[int] = []

    def publish_until_stopped() -> None:
        while not stop.is_set():
            publisher.publish("m", len(sent))
            sent.append(len(sent))

    async with clients([ws_url(first), ws_url(second)]) as sockets:
        received: list[list[int]] = [[] for _ in sockets]

        async def receive(ws: ClientConnection, into: list[int]) -> None:
            while (message := await recv_json(ws))["type"] != END:
                into.append(message["data"])

        readers = [
            asyncio.create_task(receive(ws, into))
            for ws, into in zip(sockets, received, strict=True)
        ]
        publishing = asyncio.create_task(asyncio.to_thread(publish_until_stopped))
        for fault, recover in (
            (redis_server.freeze, redis_server.thaw),
            (redis_server.kill, redis_server.restart),
        ):
            await wait_for_count(received[1], len(received[1]) + 20)
            fault()
            await unready_within([first, second], DETECTION)
            recover()
            await readiness(first, 200)
        await wait_for_count(received[1], len(received[1]) + 20)
        stop.set()
        await publishing
        await asyncio.to_thread(publisher.publish, END)
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*readers)
    # Every message once, in order, on both nodes; some attempts failed and were retried.
    assert received == [sent, sent]
    assert (await asyncio.to_thread(backplane_stats, first))["publish_failures"] > 0


async def test_a_node_started_during_an_outage_delivers_what_was_published_after_it(
    start_hubs: StartHubs, redis_server: RedisServer
) -> None:
    [first] = await start_hubs(1)
    redis_server.kill()
    await readiness(first, 503)
    [late] = await start_hubs(1)
    assert late.ready() == 503
    publisher = Publisher(first.api, retry_for=DEADLINE)
    async with client(ws_url(late)) as (ws, _):
        redis_server.restart()
        # Published as soon as the first node is back, likely before the late one joins.
        ids = [await asyncio.to_thread(publisher.publish, "m", n) for n in range(50)]
        assert len(ids) == 50
        await readiness(late, 200)
        await asyncio.to_thread(publisher.publish, END)
        assert [message["data"] for message in await until_end(ws)] == list(range(50))


async def test_resume_beyond_the_history_is_not_recovered(start_hubs: StartHubs) -> None:
    first, second = await start_hubs(2, "--history-size", "5")
    ids = [await publish(first, "m", n) for n in range(20)]
    async with client(ws_url(second, f"?since={ids[0]}")) as (ws, hello):
        assert hello["data"]["recovered"] is False
        assert hello["data"]["reason"] == f"history does not reach back to {ids[0]}"
        await nothing_more(ws)
    async with client(ws_url(second, f"?since={ids[15]}")) as (ws, hello):
        assert hello["data"]["recovered"] is True
        assert [message["data"] for message in await until_count(ws, 4)] == [16, 17, 18, 19]


STARTED = re.compile(r"started worker \d+/2 \(pid (\d+)\)")


def connection_owners(server_port: int, pids: Sequence[int]) -> dict[int, int]:
    """For each established connection to ``server_port`` held by one of ``pids``: the
    client's port and the pid of the process holding the server's end of it."""
    inodes = {}  # the server end's socket inode, by client port
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and int(local.split(":")[1], 16) == server_port:
                inodes[inode] = int(remote.split(":")[1], 16)
    owners = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    owners[inodes[target[8:-1]]] = pid
    return owners


async def test_workers_share_the_ports_and_the_messages(redis_server: RedisServer) -> None:
    arguments = ["--workers", "2", "--redis-url", redis_server.url, "--no-log-connection-events"]
    hub = await asyncio.to_thread(HubProcess, extra=arguments)
    try:
        workers = [int(pid) for pid in STARTED.findall(hub.output)]
        assert len(workers) == 2, hub.output
        async with clients([ws_url(hub)] * 20) as sockets:
            # Connections are spread by a hash of their addresses: all 20 on one worker
            # would be a 1 in 500,000 chance.
            owners = connection_owners(hub.port, workers)
            assert sorted(owners) == sorted(ws.local_address[1] for ws in sockets)
            assert set(owners.values()) == set(workers)
            ids = [await publish(hub, "m", n, TOPICS[n % len(TOPICS)]) for n in range(5)]
            await publish(hub, END)
            orders = [[m["id"] for m in await until_end(ws)] for ws in sockets]
            assert all(order == ids for order in orders)
        # SIGTERM, as an operator sends it: the parent stops both workers and exits with 0.
        code = await asyncio.to_thread(hub.stop)
        assert code == 0, hub.output
        for pid in workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert hub.output.splitlines()[-1].endswith("wshub: stopped"), hub.output
    finally:
        hub.stop()
