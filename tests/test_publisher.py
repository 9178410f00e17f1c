"""wshub.Publisher against a real hub and its internal API."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from wshub.api import start_api
from wshub.publisher import Publisher, PublishError

from .helpers import client, recv_json
from .test_resume import nothing_more

DEADLINE = 15.0


async def test_publish_and_notify_reach_subscribers(lean_server: Any) -> None:
    async with lean_server() as served, await start_api(served.hub, port=0) as api:
        publisher = Publisher(api.url)
        async with client(served.url + "?topics=news,test:t1") as (ws, _):
            published = await asyncio.to_thread(publisher.publish, "headline", {"n": 1}, ["news"])
            assert (published.recipients, published.duplicate) == (1, False)
            assert (await recv_json(ws))["data"] == {"n": 1}
            notified = await asyncio.to_thread(
                publisher.notify, "run_failed", run_id="r1", test_name="t1", error="boom"
            )
            assert notified.recipients == 1
            failed = await recv_json(ws)
            assert failed["type"] == "run_failed" and failed["data"]["error"] == "boom"


async def test_refusals_carry_status_and_field(lean_server: Any) -> None:
    async with (
        lean_server() as served,
        await start_api(served.hub, port=0, publish_token="t") as api,
    ):
        with pytest.raises(PublishError) as refused:
            await asyncio.to_thread(Publisher(api.url).publish, "x")
        assert refused.value.status == 401
        with pytest.raises(PublishError) as bad:
            await asyncio.to_thread(
                Publisher(api.url, token="t").notify, "run_progress", run_id="r", test_name="t"
            )
        assert bad.value.status == 400 and bad.value.field == "progress"


async def test_watchers_say_how_many_clients_a_topic_would_reach(lean_server: Any) -> None:
    async with (
        lean_server() as served,
        await start_api(served.hub, port=0, publish_token="t") as api,
    ):
        publisher = Publisher(api.url, token="t")
        assert await asyncio.to_thread(publisher.watchers, "run:r1") == 0
        async with (
            client(served.url + "?topics=run:r1,test:t1") as _,
            client(served.url + "?topics=run:r1") as _,
            client(served.url + "?topics=*") as _,
        ):
            assert await asyncio.to_thread(publisher.watchers, "run:r1") == 3
            assert await asyncio.to_thread(publisher.watchers, "run:r2") == 1  # the "*" one
        await asyncio.wait_for(_until(lambda: served.hub.client_count == 0), DEADLINE)
        assert await asyncio.to_thread(publisher.watchers, "run:r1") == 0
        with pytest.raises(PublishError) as bad:
            await asyncio.to_thread(publisher.watchers, "")
        assert bad.value.status == 400 and bad.value.field == "topic"


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.01)


def test_unreachable_hub() -> None:
    with pytest.raises(PublishError, match="cannot reach") as refused:
        Publisher("http://127.0.0.1:1", timeout=2, retry_for=0).publish("x")
    assert (refused.value.status, refused.value.outcome) == (None, "not_published")


async def test_one_key_is_one_delivery_and_each_call_has_a_key_of_its_own(
    lean_server: Any,
) -> None:
    async with lean_server() as served, await start_api(served.hub, port=0) as api:
        publisher = Publisher(api.url)
        async with client(served.url) as (ws, _):
            answers = []
            for _ in range(2):
                answers.append(
                    await asyncio.to_thread(publisher.publish, "m", "keyed", idempotency_key="k")
                )
                await asyncio.to_thread(
                    publisher.notify,
                    "run_failed",
                    idempotency_key="f",
                    run_id="r",
                    test_name="t",
                    error="x",
                )
            for _ in range(2):  # no key given: two calls, two messages
                await asyncio.to_thread(publisher.publish, "m", "unkeyed")
            messages = [await recv_json(ws) for _ in range(4)]
            assert [m["type"] for m in messages] == ["m", "run_failed", "m", "m"]
            assert [m.get("data") for m in messages if m["type"] == "m"] == [
                "keyed",
                "unkeyed",
                "unkeyed",
            ]
            first, again = answers
            assert (first.id, first.recipients, first.duplicate) == (messages[0]["id"], 1, False)
            assert (again.id, again.recipients, again.duplicate) == (first.id, 0, True)
            await nothing_more(ws)


async def test_a_publisher_retries_a_lost_answer_until_the_hub_is_up(lean_server: Any) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    async with lean_server() as served, client(served.url) as (ws, _):
        publisher = Publisher(f"http://127.0.0.1:{port}", retry_for=DEADLINE)
        publishing = asyncio.create_task(asyncio.to_thread(publisher.publish, "m", 1))
        # The first attempt's connection is closed before any answer: outcome unknown.
        with listener:
            connection, _ = await loop.sock_accept(listener)
            connection.close()
        async with await start_api(served.hub, port=port):
            assert (await publishing).recipients == 1
            assert (await recv_json(ws))["data"] == 1
            await nothing_more(ws)
