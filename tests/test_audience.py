"""Who watches what across joined hubs: each shares its audience, and any one adds them up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from redis import Redis as SyncRedis

import wshub
from wshub.audience import Audience, total
from wshub.backplane import MemoryBackplane, MemoryStream
from wshub.bench.redis_server import RedisServer

from .helpers import TIMEOUT, client


def test_a_topic_s_watchers_add_up_by_the_reach_of_a_message() -> None:
    # Hub one: a client on run:1, a client on "*" and run:1 (one watcher, not two), one on "*".
    one = Audience(2, {"run:1": (2, 3)})
    # Hub two: nobody on run:1; one client on "*" and one on test:a.
    two = Audience(1, {"test:a": (1, 2)})
    both = total([one, two])
    assert both.hubs == 2
    assert (both.subscribers("run:1"), both.watchers("run:1")) == (2, 4)
    assert (both.subscribers("test:a"), both.watchers("test:a")) == (1, 4)
    assert (both.subscribers("run:9"), both.watchers("run:9")) == (0, 3)
    assert (both.subscribers("*"), both.watchers("*")) == (3, 3)
    assert both.by_topic() == {
        "*": {"subscribers": 3, "watchers": 3},
        "run:1": {"subscribers": 2, "watchers": 4},
        "test:a": {"subscribers": 1, "watchers": 4},
    }
    assert Audience.decode(one.encode()) == one


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> None:
    """Wait until ``check()`` holds: the hubs share their audience every second."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_hubs_on_one_stream_count_each_other_s_watchers(hub_server: Any) -> None:
    stream = MemoryStream()
    async with (
        hub_server(backplane=MemoryBackplane(stream)) as first,
        hub_server(backplane=MemoryBackplane(stream)) as second,
        contextlib.AsyncExitStack() as stack,
    ):
        for url in (
            first.url + "?topics=run:1",
            first.url + "?topics=*,run:1",
            second.url + "?topics=*",
            second.url + "?topics=test:a",
        ):
            await stack.enter_async_context(client(url))
        assert first.hub.local_audience() == Audience(1, {"run:1": (2, 2)})
        for served in (first, second):

            async def counted(hub: wshub.Hub = served.hub) -> bool:
                audience = await hub.audience()
                return audience.hubs == 2 and audience.watchers("run:1") == 3

            await eventually(counted)
            audience = await served.hub.audience()
            assert audience.by_topic() == {
                "*": {"subscribers": 2, "watchers": 2},
                "run:1": {"subscribers": 2, "watchers": 3},
                "test:a": {"subscribers": 1, "watchers": 3},
            }


async def test_hubs_over_redis_count_each_other_s_watchers_until_one_stops(
    lean_server: Any, redis_server: RedisServer
) -> None:
    url = redis_server.url
    async with lean_server(redis_url=url) as first, client(first.url + "?topics=run:1"):
        async with lean_server(redis_url=url) as second, client(second.url + "?topics=run:1"):

            async def counted() -> bool:
                hub: wshub.Hub = first.hub
                return (await hub.audience()).watchers("run:1") == 2

            await eventually(counted)
            assert (await second.hub.audience()).subscribers("run:1") == 2
        # The second hub took its report out as it stopped.
        audience = await first.hub.audience()
        assert (audience.hubs, audience.watchers("run:1")) == (1, 1)
    redis = SyncRedis.from_url(url)
    try:
        assert redis.keys("wshub:messages:audience*") == []
    finally:
        redis.close()
