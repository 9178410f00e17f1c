"""Joined hubs: one order everywhere, resume on another hub, and Redis's outages.

The behaviour every backplane owes the hub runs against a real Redis and against a
MemoryStream (the ``joined`` fixture); what only Redis does (outages, trimming, foreign
entries) runs against Redis. The hubs run in the test's process, each behind its own
socket; the multi-process deployment (``wshub serve --redis-url``, ``--workers``) is tested
in test_scale_out.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

import wshub
from wshub.backplane import (
    MIN_STREAM_LENGTH,
    NOT_PUBLISHED,
    UNKNOWN,
    Entry,
    MemoryBackplane,
    MemoryStream,
)
from wshub.bench.redis_server import RedisServer
from wshub.redis_backplane import COMMAND_TIMEOUT, PROBE_INTERVAL, RedisBackplane

from .helpers import TIMEOUT, HubServer, client, recv_json, send_json, wait_until
from .test_resume import nothing_more, published

Joined = Callable[..., contextlib.AbstractAsyncContextManager[list[HubServer]]]


def joiner(
    lean_server: Any, backplane_options: Callable[[dict[str, Any]], dict[str, Any]]
) -> Joined:
    """``async with joined(n, **config) as hubs``: n hubs started by ``lean_server``, each with
    the options ``backplane_options(config)`` adds to join them."""

    @contextlib.asynccontextmanager
    async def start(count: int, **config: Any) -> AsyncIterator[list[HubServer]]:
        async with contextlib.AsyncExitStack() as stack:
            hubs = [
                await stack.enter_async_context(lean_server(**backplane_options(config), **config))
                for _ in range(count)
            ]
            for served in hubs:
                assert served.hub.ready
            yield hubs

    return start


@pytest.fixture
def joined_redis(lean_server: Any, redis_server: RedisServer) -> Joined:
    """Hubs joined through the test's Redis."""
    return joiner(lean_server, lambda config: {"redis_url": redis_server.url})


@pytest.fixture(params=["redis", "memory"])
def joined(request: pytest.FixtureRequest, lean_server: Any) -> Joined:
    """Hubs joined through the test's Redis, then through one MemoryStream: the behaviour
    every backplane owes the hub."""
    if request.param == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        return joiner(lean_server, lambda config: {"redis_url": redis_server.url})

    def memory(config: dict[str, Any]) -> dict[str, Any]:
        stream = streams.setdefault(
            "stream",
            MemoryStream(
                history_size=config.get("history_size", 1000),
                history_ttl=config.get("history_ttl", 300.0),
            ),
        )
        return {"backplane": MemoryBackplane(stream)}

    streams: dict[str, MemoryStream] = {}
    return joiner(lean_server, memory)


async def test_every_client_on_every_hub_gets_each_message_once_in_one_order(
    joined: Any,
) -> None:
    async with joined(3) as hubs, contextlib.AsyncExitStack() as stack:
        sockets: list[ClientConnection] = []
        for served in hubs:
            for _ in range(2):
                ws, _ = await stack.enter_async_context(client(served.url))
                sockets.append(ws)
        # Publishes on every hub at once, interleaved: awaited and fire-and-forget.
        results = await asyncio.gather(
            *(hubs[n % 3].hub.publish("m", {"n": n}) for n in range(0, 60, 2))
        )
        for n in range(1, 60, 2):
            assert hubs[n % 3].hub.broadcast_to_all("m", {"n": n}) == 0
        ids = {result.id for result in results}
        assert len(ids) == 30
        # Each awaited publish returned once its own hub had queued it for its 2 clients.
        assert {result.recipients for result in results} == {2}
        orders = []
        for ws in sockets:
            messages = await published(ws, 60)
            await nothing_more(ws)
            orders.append([(message["id"], message["data"]["n"]) for message in messages])
        assert all(order == orders[0] for order in orders)
        assert sorted(n for _, n in orders[0]) == list(range(60))
        seen_ids = [message_id for message_id, _ in orders[0]]
        assert ids <= set(seen_ids)
        keys = [tuple(map(int, message_id.split("-"))) for message_id in seen_ids]
        assert keys == sorted(keys) and len(set(keys)) == 60


async def test_topics_are_honoured_on_every_hub(joined: Any) -> None:
    async with joined(2) as hubs:
        first, second = hubs
        async with (
            client(first.url + "?topics=a") as (on_a, _),
            client(second.url + "?topics=b") as (on_b, _),
            client(second.url + "?topics=a,b") as (on_both, _),
        ):
            await first.hub.publish("m", 1, "a")
            await second.hub.publish("m", 2, ["b"])
            await first.hub.publish("m", 3, ["a", "b"])
            first.hub.notify_run_started("r-1", "t")  # to run:r-1 and test:t, nobody here
            await first.hub.publish("m", 4)
            assert [m["data"] for m in await published(on_a, 3)] == [1, 3, 4]
            assert [m["data"] for m in await published(on_b, 3)] == [2, 3, 4]
            assert [m["data"] for m in await published(on_both, 4)] == [1, 2, 3, 4]
            for ws in (on_a, on_b, on_both):
                await nothing_more(ws)


async def test_data_arrives_as_published(joined: Any) -> None:
    payload = {"run": {"id": "r-1", "scores": [1.5, 2, None], "ok": True}, "name": "é€"}
    async with joined(2) as (first, second), client(second.url) as (ws, _):
        published_ = await first.hub.publish("new_run", payload)
        message = await recv_json(ws)
        assert message["type"] == "new_run"
        assert message["data"] == payload
        assert message["id"] == published_.id
        assert message["timestamp"].endswith("Z")
        await second.hub.publish("empty")
        assert "data" not in await recv_json(ws)


async def test_publish_threadsafe_goes_through_the_backplane(joined: Any) -> None:
    async with joined(2) as (first, second), client(second.url) as (ws, _):
        future = await asyncio.to_thread(first.hub.publish_threadsafe, "m", 1)
        # The count is the publishing hub's clients: none on the first hub.
        assert await asyncio.wrap_future(future) == 0
        assert (await recv_json(ws))["data"] == 1


async def test_bad_publishes_fail_before_reaching_the_backplane(joined: Any) -> None:
    async with joined(1) as (served,):
        with pytest.raises(ValueError, match="reserved"):
            await served.hub.publish("subscribed", 1)
        with pytest.raises(TypeError):
            await served.hub.publish("m", {1, 2})
        with pytest.raises(TypeError):
            served.hub.broadcast_to_all("m", object())
        assert served.hub.stats()["backplane"]["publish_failures"] == 0


async def test_resume_on_another_hub_while_publishing_goes_on(joined: Any) -> None:
    async with joined(2) as (first, second):
        async with client(first.url + "?topics=a") as (ws, _):
            await first.hub.publish("m", 0, "a")
            [seen] = await published(ws, 1)
        stop = asyncio.Event()
        sent: list[int] = []

        async def keep_publishing() -> None:
            n = 1
            while not stop.is_set():
                hub = (first if n % 2 else second).hub
                await hub.publish("m", n, "a" if n % 3 else "b")
                sent.append(n)
                n += 1
                await asyncio.sleep(0)

        publisher = asyncio.create_task(keep_publishing())
        await wait_until(lambda: len(sent) >= 20)
        # The second hub never delivered to this client: it reads what it does not hold
        # from Redis, and holds back live messages until the replay is out.
        async with client(second.url + f"?topics=a&since={seen['id']}") as (ws, hello):
            assert hello["data"]["recovered"] is True
            await wait_until(lambda: len(sent) >= 60)
            stop.set()
            await publisher
            expected = [n for n in sent if n % 3]
            received = [m["data"] for m in await published(ws, len(expected))]
            assert received == expected
            await nothing_more(ws)


async def test_subscribe_with_since_on_another_hub(joined: Any) -> None:
    async with joined(2) as (first, second):
        results = [await first.hub.publish("m", n, "a") for n in range(5)]
        async with client(second.url + "?topics=") as (ws, _):
            await send_json(
                ws, {"type": "subscribe", "data": {"topics": ["a"], "since": results[1].id}}
            )
            # Sent before the answer arrives: answered after it and its replay, in order.
            await send_json(ws, {"type": "ping"})
            answer = await recv_json(ws)
            assert answer["type"] == "subscribed", answer
            assert answer["data"]["recovered"] is True
            assert answer["data"]["topics"] == ["a"]
            assert [m["data"] for m in await published(ws, 3)] == [2, 3, 4]
            assert (await recv_json(ws))["type"] == "pong"
            await first.hub.publish("m", 5, "a")
            assert [m["data"] for m in await published(ws, 1)] == [5]
            await nothing_more(ws)


async def test_resume_beyond_the_history_is_not_recovered(joined: Any) -> None:
    async with joined(2, history_size=5) as (first, second):
        results = [await first.hub.publish("m", n) for n in range(12)]
        url = second.url + f"?since={results[0].id}"
        async with client(url) as (ws, hello):
            assert hello["data"]["recovered"] is False
            assert hello["data"]["reason"] == f"history does not reach back to {results[0].id}"
            await nothing_more(ws)
        # Within the last five: recovered from Redis by a hub that delivered them, or not.
        async with client(second.url + f"?since={results[7].id}") as (ws, hello):
            assert hello["data"]["recovered"] is True
            assert [m["data"] for m in await published(ws, 4)] == [8, 9, 10, 11]


async def test_unknown_ids_are_not_recovered(joined: Any) -> None:
    async with joined(2) as (first, second):
        result = await first.hub.publish("m", 1)
        ms, _ = map(int, result.id.split("-"))
        for since in (f"{ms + 60_000}-0", f"{ms}-999"):
            async with client(second.url + f"?since={since}") as (ws, hello):
                assert hello["data"]["recovered"] is False
                assert hello["data"]["reason"] == "unknown message id"
                await first.hub.publish("m", 2)
                assert [m["data"] for m in await published(ws, 1)] == [2]


async def test_a_client_ahead_of_its_new_hub_gets_no_duplicates(
    lean_server: Any, redis_server: RedisServer
) -> None:
    # The new hub starts after the messages: the client has seen ids it never delivered.
    async with lean_server(redis_url=redis_server.url) as first:
        results = [await first.hub.publish("m", n) for n in range(3)]
        async with (
            lean_server(redis_url=redis_server.url) as second,
            client(second.url + f"?since={results[2].id}") as (ws, hello),
        ):
            assert hello["data"]["recovered"] is True
            await nothing_more(ws)
            await first.hub.publish("m", 3)
            assert [m["data"] for m in await published(ws, 1)] == [3]


async def test_redis_outage_keeps_clients_fails_publishes_and_recovers(
    joined_redis: Joined, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with joined_redis(2) as (first, second):
        async with client(first.url) as (ws, _), client(second.url) as (other, _):
            before = await second.hub.publish("m", "before")
            assert (await recv_json(ws))["data"] == "before"
            assert (await recv_json(other))["data"] == "before"
            redis_server.kill()
            await wait_until(lambda: not first.hub.ready and not second.hub.ready)
            with pytest.raises(wshub.BackplaneUnavailable, match="unreachable"):
                await first.hub.publish("m", "lost")
            with pytest.raises(wshub.BackplaneUnavailable):
                second.hub.broadcast_to_all("m", "lost")
            with pytest.raises(wshub.BackplaneUnavailable):
                await asyncio.wrap_future(second.hub.publish_threadsafe("m", "lost"))
            # The clients are still served.
            await send_json(ws, {"type": "ping"})
            assert (await recv_json(ws))["type"] == "pong"
            stats = first.hub.stats()["backplane"]
            assert stats["ready"] is False and stats["disconnects"] == 1
            assert stats["publish_failures"] >= 1
            # Logged once per hub, not once per attempt to reconnect.
            assert caplog.text.count("is unreachable (") == 2
            redis_server.restart()
            await wait_until(lambda: first.hub.ready and second.hub.ready, timeout=15)
            after = await first.hub.publish("m", "after")
            assert (await recv_json(ws))["data"] == "after"
            assert (await recv_json(other))["data"] == "after"
            assert first.hub.stats()["backplane"]["reconnects"] == 1
            assert caplog.text.count("is reachable again") == 2
            await nothing_more(ws)
        # History kept by Redis (append-only file) survives the restart.
        async with client(second.url + f"?since={before.id}") as (ws, hello):
            assert hello["data"]["recovered"] is True
            [message] = await published(ws, 1)
            assert message["id"] == after.id


async def test_an_outage_is_one_disconnect_and_never_ready_however_long_it_lasts(
    lean_server: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Each retry used to call Redis reachable before any command reached it: ready for a
    moment, a reconnect and an outage counted and logged per retry."""
    async with lean_server(redis_url=redis_server.url) as served:
        hub = served.hub
        assert hub.ready
        redis_server.kill()
        await wait_until(lambda: not hub.ready)
        # Two seconds of outage: about five retries with the backoff from 50 ms.
        loop = asyncio.get_running_loop()
        deadline, ready_seen = loop.time() + 2.0, 0
        while loop.time() < deadline:
            ready_seen += hub.ready
            await asyncio.sleep(0.002)
        stats = hub.stats()["backplane"]
        assert ready_seen == 0
        assert (stats["disconnects"], stats["reconnects"]) == (1, 0)
        assert caplog.text.count("is unreachable (") == 1
        assert "reachable again" not in caplog.text
        redis_server.restart()
        await wait_until(lambda: hub.ready, timeout=15)
        assert hub.stats()["backplane"]["reconnects"] == 1
        assert caplog.text.count("is reachable again") == 1


async def test_the_backoff_doubles_through_an_outage(
    lean_server: Any, redis_server: RedisServer
) -> None:
    async with lean_server(redis_url=redis_server.url) as served:
        hub = served.hub
        redis_server.kill()
        await wait_until(lambda: not hub.ready)
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        # From 50 ms doubling, with jitter of at most half: the sixth retry starts after at
        # least 0.025 + 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s, and never sooner.
        await wait_until(lambda: hub.stats()["backplane"]["reconnect_attempts"] >= 6, timeout=10)
        assert loop.time() - lost_at >= 1.5
        redis_server.restart()
        await wait_until(lambda: hub.ready, timeout=15)


async def test_a_frozen_redis_is_not_ready_within_seconds_and_for_the_whole_freeze(
    lean_server: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP keeps Redis' sockets open: each retry used to wait out the reader's 6 s
    socket timeout while /readyz said ready."""
    async with lean_server(redis_url=redis_server.url) as served, client(served.url) as (ws, _):
        hub = served.hub
        loop = asyncio.get_running_loop()
        redis_server.freeze()
        frozen_at = loop.time()
        await wait_until(lambda: not hub.ready, timeout=PROBE_INTERVAL + COMMAND_TIMEOUT + 1.0)
        # Longer than the reader's socket timeout, so its own retries fail inside the freeze.
        while loop.time() < frozen_at + 9.0:
            assert not hub.ready
            await asyncio.sleep(0.01)
        await send_json(ws, {"type": "ping"})  # the hub's clients are still served
        assert (await recv_json(ws))["type"] == "pong"
        stats = hub.stats()["backplane"]
        assert (stats["disconnects"], stats["reconnects"]) == (1, 0)
        assert caplog.text.count("is unreachable (") == 1
        redis_server.thaw()
        await wait_until(lambda: hub.ready, timeout=15)
        assert hub.stats()["backplane"]["reconnects"] == 1
        assert caplog.text.count("is reachable again") == 1
        published_id = (await hub.publish("m", "after")).id
        assert (await recv_json(ws))["id"] == published_id


async def test_a_publish_sent_to_a_frozen_redis_is_unknown_and_its_retry_is_delivered_once(
    lean_server: Any, redis_server: RedisServer
) -> None:
    url = redis_server.url
    async with (
        lean_server(redis_url=url) as first,
        lean_server(redis_url=url) as second,
        client(second.url) as (ws, _),
    ):
        redis_server.freeze()
        # Sent before the probe notices: Redis holds the command and runs it when it resumes.
        with pytest.raises(wshub.BackplaneUnavailable, match=r"^outcome unknown") as unknown:
            await first.hub.publish("m", "once", idempotency_key="run-42:new_run")
        assert unknown.value.outcome == UNKNOWN
        await wait_until(lambda: not first.hub.ready, timeout=10)
        with pytest.raises(wshub.BackplaneUnavailable) as refused:
            await first.hub.publish("m", "never")
        assert refused.value.outcome == NOT_PUBLISHED
        redis_server.thaw()
        await wait_until(lambda: first.hub.ready and second.hub.ready, timeout=15)
        retried = await first.hub.publish("m", "once", idempotency_key="run-42:new_run")
        await first.hub.publish("m", "end")
        messages = [message async for message in until_data(ws, "end")]
        assert [message["data"] for message in messages] == ["once"]
        assert messages[0]["id"] == retried.id
        # The frozen Redis ran the first attempt when it resumed: the retry found its key.
        assert retried.duplicate and retried.recipients == 0


async def until_data(ws: ClientConnection, last: Any) -> AsyncIterator[dict[str, Any]]:
    """The published messages before the one whose data is ``last``."""
    while (message := await recv_json(ws))["data"] != last:
        assert "id" in message, message
        yield message


async def test_idempotency_keys_deliver_once_across_hubs(joined: Joined) -> None:
    async with (
        joined(2) as (first, second),
        client(first.url) as (ws, _),
        client(second.url) as (other, _),
    ):
        original = await first.hub.publish("m", 1, idempotency_key="k")
        again = await second.hub.publish("m", 1, idempotency_key="k")
        assert not original.duplicate and original.recipients == 1
        assert again == (original.id, 0, True)
        other_key = await second.hub.publish("m", 2, idempotency_key="k2")
        assert not other_key.duplicate
        for socket in (ws, other):
            assert [m["data"] for m in await published(socket, 2)] == [1, 2]
            await nothing_more(socket)


async def test_idempotency_keys_on_a_hub_alone(lean_server: Any) -> None:
    async with lean_server() as served, client(served.url) as (ws, _):
        original = await served.hub.publish("m", 1, idempotency_key="k")
        assert await served.hub.publish("m", 1, idempotency_key="k") == (original.id, 0, True)
        assert [m["id"] for m in await published(ws, 1)] == [original.id]
        await nothing_more(ws)
        for bad, error in (("", ValueError), ("x" * 129, ValueError), (7, TypeError)):
            with pytest.raises(error, match="idempotency_key"):
                await served.hub.publish("m", 1, idempotency_key=bad)


async def test_an_idempotency_key_is_forgotten_after_its_window(lean_server: Any) -> None:
    async with lean_server(idempotency_window=0.2) as served, client(served.url) as (ws, _):
        first = await served.hub.publish("m", 1, idempotency_key="k")
        assert (await served.hub.publish("m", 1, idempotency_key="k")).duplicate
        await asyncio.sleep(0.25)  # the window itself is what is tested
        second = await served.hub.publish("m", 1, idempotency_key="k")
        assert not second.duplicate and second.id != first.id
        assert len(await published(ws, 2)) == 2


async def test_a_hub_started_while_redis_is_down_misses_nothing_published_after_its_start(
    lean_server: Any, redis_server: RedisServer
) -> None:
    """It used to start reading at the stream's end when it first reached Redis, skipping
    what other hubs had published since Redis came back."""
    redis_server.kill()
    async with lean_server(redis_url=redis_server.url) as served, client(served.url) as (ws, _):
        hub = served.hub
        assert not hub.ready
        # Its retries are seconds apart by now, so the publishes below come before the next.
        await wait_until(lambda: hub.stats()["backplane"]["reconnect_attempts"] >= 6, timeout=10)
        redis_server.restart()
        writer = Redis.from_url(redis_server.url)
        try:
            for n in range(5):
                await writer.xadd("wshub:messages", {"type": "m", "data": str(n)})
        finally:
            await writer.aclose()
        assert not hub.ready  # what is tested: these were published before it joined
        await wait_until(lambda: hub.ready, timeout=15)
        assert [m["data"] for m in await published(ws, 5)] == [0, 1, 2, 3, 4]
        await hub.publish("m", 5)
        assert [m["data"] for m in await published(ws, 1)] == [5]


async def test_a_hub_starts_while_redis_is_down_and_joins_later(
    lean_server: Any, redis_server: RedisServer
) -> None:
    redis_server.kill()
    async with lean_server(redis_url=redis_server.url) as served:
        assert served.hub.running and not served.hub.ready
        async with client(served.url) as (ws, _):
            with pytest.raises(wshub.BackplaneUnavailable):
                await served.hub.publish("m", 1)
            redis_server.restart()
            await wait_until(lambda: served.hub.ready, timeout=15)
            await served.hub.publish("m", 2)
            assert (await recv_json(ws))["data"] == 2


async def test_a_bad_redis_url_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"^redis_url must be"):
        wshub.HubConfig(redis_url="http://127.0.0.1:6379")
    with pytest.raises(ValueError, match=r"^redis_stream must be"):
        wshub.HubConfig(redis_stream="")


async def test_hubs_on_other_streams_stay_apart(joined_redis: Joined, lean_server: Any) -> None:
    async with joined_redis(1) as (first,):
        assert isinstance(first.hub.backplane, RedisBackplane)
        url = first.hub.config.redis_url
        async with (
            lean_server(redis_url=url, redis_stream="other") as other,
            client(other.url) as (ws, _),
        ):
            await first.hub.publish("m", 1)
            await other.hub.publish("m", 2)
            assert (await recv_json(ws, TIMEOUT))["data"] == 2
            await nothing_more(ws)


async def test_foreign_stream_entries_are_skipped(
    joined_redis: Joined, redis_server: RedisServer
) -> None:
    async with joined_redis(1) as (served,), client(served.url) as (ws, _):
        redis = Redis.from_url(redis_server.url)
        try:
            await redis.xadd("wshub:messages", {"unrelated": "1"})
            await redis.xadd("wshub:messages", {"type": "m", "topics": "not json"})
        finally:
            await redis.aclose()
        await served.hub.publish("m", "after")
        assert (await recv_json(ws))["data"] == "after"
        assert served.hub.ready


async def test_messages_trimmed_before_a_hub_read_them_are_counted_and_logged(
    joined_redis: Joined, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with joined_redis(1) as (served,), client(served.url) as (ws, _):
        # A blocking client: the hub's loop cannot read while the stream is written and
        # trimmed (as if the hub had fallen far behind).
        writer = SyncRedis.from_url(redis_server.url)
        try:
            for n in range(20):
                writer.xadd(
                    "wshub:messages", {"type": "m", "data": str(n)}, maxlen=5, approximate=False
                )
        finally:
            writer.close()
        received: list[int] = []
        gaps: list[dict[str, Any]] = []
        while not received or received[-1] != 19:
            message = await recv_json(ws)
            if message["type"] == "gap":
                gaps.append(message["data"])
            else:
                received.append(message["data"])
        assert received[-5:] == [15, 16, 17, 18, 19]
        assert received == sorted(received) and len(received) < 20
        # Exactly the messages it did not receive are counted, and the client is told.
        assert served.hub.stats()["backplane"]["missed"] == 20 - len(received)
        assert sum(gap["missed"] for gap in gaps) == 20 - len(received)
        assert "left Redis stream wshub:messages before this hub read them" in caplog.text
        await served.hub.publish("m", 20)
        assert (await recv_json(ws))["data"] == 20
        assert served.hub.stats()["backplane"]["missed"] == 20 - len(received)


async def test_messages_trimmed_while_a_hub_waited_for_them_reach_its_clients_as_a_gap(
    joined_redis: Joined, redis_server: RedisServer
) -> None:
    """The hub's XREAD is waiting when twenty messages arrive in one transaction that keeps
    five: it reads those five, and its position is still in the stream afterwards."""
    async with joined_redis(1) as (served,), client(served.url) as (ws, _):
        last = (await served.hub.publish("m", "seen")).id
        assert [m["data"] for m in await published(ws, 1)] == ["seen"]
        writer = Redis.from_url(redis_server.url)
        try:
            async with writer.pipeline(transaction=True) as pipe:
                for n in range(20):
                    pipe.xadd(
                        "wshub:messages",
                        {"type": "m", "data": str(n)},
                        maxlen=5,
                        approximate=False,
                    )
                await pipe.execute()
        finally:
            await writer.aclose()
        assert [m["data"] for m in await published(ws, 5)] == [15, 16, 17, 18, 19]
        gap = await recv_json(ws)
        assert (gap["type"], gap["data"]) == ("gap", {"missed": 15, "after": last})
        assert served.hub.stats()["backplane"]["missed"] == 15


@pytest.mark.usefixtures("redis_server_binary")
async def test_a_redis_that_lost_its_data_is_joined_again(lean_server: Any) -> None:
    with RedisServer(persistent=False) as redis_server:
        async with (
            lean_server(redis_url=redis_server.url) as first,
            lean_server(redis_url=redis_server.url) as second,
            client(second.url) as (ws, _),
        ):
            before = await first.hub.publish("m", "before")
            assert (await recv_json(ws))["data"] == "before"
            redis_server.kill()
            await wait_until(lambda: not first.hub.ready)
            redis_server.restart()  # empty: the stream and its history are gone
            await wait_until(lambda: first.hub.ready and second.hub.ready, timeout=15)
            for n in range(3):
                await first.hub.publish("m", n)
            assert [m["data"] for m in await published(ws, 3)] == [0, 1, 2]
            await nothing_more(ws)
            assert second.hub.stats()["backplane"]["missed"] == 0
            # A hub that delivered them still holds them in its own history...
            async with client(second.url + f"?since={before.id}") as (resumed, hello):
                assert hello["data"]["recovered"] is True
                assert [m["data"] for m in await published(resumed, 3)] == [0, 1, 2]
            # ...a hub that did not must ask Redis, which has lost them.
            async with (
                lean_server(redis_url=redis_server.url) as third,
                client(third.url + f"?since={before.id}") as (_, hello),
            ):
                assert hello["data"]["recovered"] is False
                assert hello["data"]["reason"] == f"history does not reach back to {before.id}"


async def test_clients_are_told_of_messages_their_hub_never_read(lean_server: Any) -> None:
    stream = MemoryStream()
    async with (
        lean_server(backplane=MemoryBackplane(stream)) as served,
        client(served.url + "?topics=a") as (ws, _),
    ):
        last = (await served.hub.publish("m", "seen", "a")).id
        assert [m["data"] for m in await published(ws, 1)] == ["seen"]
        for n in range(MIN_STREAM_LENGTH + 3):  # without yielding: the hub falls behind
            stream.add("m", str(n).encode(), ["b"])
        gap = await recv_json(ws)
        assert gap["type"] == "gap" and "id" not in gap
        assert gap["data"] == {"missed": 3, "after": last}
        await nothing_more(ws)


async def test_a_memory_backplane_counts_what_left_its_stream_unread() -> None:
    stream = MemoryStream()
    backplane = MemoryBackplane(stream)
    delivered: list[Entry] = []
    missed: list[tuple[int | None, str]] = []
    await backplane.start(delivered.append, lambda count, after: missed.append((count, after)))
    before = backplane.position
    extra = 5
    # Added without yielding to the loop: the reader falls behind the whole stream.
    ids = [
        stream.add("m", str(n).encode(), None).message_id for n in range(MIN_STREAM_LENGTH + extra)
    ]
    await wait_until(lambda: len(delivered) == MIN_STREAM_LENGTH)
    assert [entry.message_id for entry in delivered] == ids[extra:]
    assert backplane.stats()["missed"] == extra
    assert missed == [(extra, before)]
    assert backplane.position == ids[-1]
    stored = await backplane.entries(ids[0], ids[-1])
    assert (stored.recovered, stored.reason) == (False, f"history does not reach back to {ids[0]}")
    await backplane.close()
    with pytest.raises(wshub.BackplaneUnavailable):
        backplane.publish("m", None, None)


async def test_redis_retains_the_state_within_the_snapshot_bounds(
    lean_server: Any, redis_server: RedisServer
) -> None:
    """The script that adds each entry applies wshub.snapshot's bounds in Redis: a hub that
    joins later shows the same state a hub that delivered everything shows."""
    url = redis_server.url
    bounds = {"snapshot_window": 2, "snapshot_max_keys": 2, "snapshot_key_ttl": 60.0}
    async with lean_server(redis_url=url, **bounds) as first:
        for n in range(4):
            await first.hub.publish("event", n, "a")
            await first.hub.publish("progress", n, "a", key=f"run:{n}")
        async with (
            lean_server(redis_url=url, **bounds) as second,
            client(first.url + "?topics=a&snapshot=1") as (here, _),
            client(second.url + "?topics=a&snapshot=1") as (there, hello),
        ):
            assert hello["data"]["snapshot_messages"] == 4
            expected = [("event", 2), ("progress", 2), ("event", 3), ("progress", 3)]
            for ws in (here, there):
                shown = await published(ws, 4)
                assert [(m["type"], m["data"]) for m in shown] == expected
                await nothing_more(ws)
    redis = SyncRedis.from_url(url)
    try:
        assert sorted(redis.hkeys("wshub:messages:state")) == [b"run:2", b"run:3"]
        assert redis.zcard("wshub:messages:state:published") == 2
        assert redis.xlen("wshub:messages:events") == 2
    finally:
        redis.close()


async def test_redis_forgets_a_key_once_its_ttl_has_passed(
    lean_server: Any, redis_server: RedisServer
) -> None:
    """The next keyed publish after a key's ttl removes it from Redis (a hub's own copy
    expires by the same rule: test_snapshot.py)."""
    url = redis_server.url
    redis = SyncRedis.from_url(url)
    try:
        async with lean_server(redis_url=url, snapshot_key_ttl=0.2) as served:
            await served.hub.publish("progress", 1, "a", key="run:old")
            assert redis.hkeys("wshub:messages:state") == [b"run:old"]
            # The ttl is the behaviour under test: wait for it to pass on the clock.
            await asyncio.sleep(0.3)
            await served.hub.publish("progress", 2, "a", key="run:new")
            assert redis.hkeys("wshub:messages:state") == [b"run:new"]
            assert redis.zrange("wshub:messages:state:published", 0, -1) == [b"run:new"]
    finally:
        redis.close()
