"""Message history and resume over real sockets: ``?since=`` and ``subscribe`` with ``since``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from .helpers import TIMEOUT, client, recv_json, send_json


async def published(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    """The next ``count`` published messages (those with an id); replies fail the test."""
    messages = []
    for _ in range(count):
        message = await recv_json(ws)
        assert "id" in message, message
        messages.append(message)
    return messages


async def nothing_more(ws: ClientConnection) -> None:
    """Nothing else is queued for the client: a ping's answer comes next, and the hub queues
    replies behind everything it queued for the client before."""
    await send_json(ws, {"type": "ping"})
    reply = await recv_json(ws)
    assert reply["type"] == "pong", reply


async def seen_id(served: Any, topics: str, publish: Any) -> str:
    """Connect with ``?topics=``, receive one message ``publish()`` sends, disconnect; its id."""
    async with client(served.url + f"?topics={topics}") as (ws, _):
        publish()
        [message] = await published(ws, 1)
    return str(message["id"])


async def test_resume_replays_exactly_the_missed_matching_messages_then_live(
    hub_server: Any,
) -> None:
    async with hub_server() as served:
        hub = served.hub
        last = await seen_id(served, "a", lambda: hub.broadcast_to_subscribers("m", 1, "a"))
        # Missed while away: every way of publishing, some for others.
        hub.broadcast_to_subscribers("m", 2, ["a"])
        hub.broadcast_to_subscribers("m", 3, ["b"])
        hub.broadcast_to_all("m", 4)
        hub.broadcast_to_subscribers("m", 5, ["b", "a"])
        hub.notify_run_started("r-1", "a")  # topics run:r-1 and test:a: not "a"
        await asyncio.wrap_future(hub.publish_threadsafe("m", 6, "a"))
        await asyncio.to_thread(lambda: hub.publish_threadsafe("m", 7).result(TIMEOUT))
        async with client(served.url + f"?topics=a&since={last}") as (ws, hello):
            assert hello["data"]["recovered"] is True
            assert "reason" not in hello["data"]
            assert hello["data"]["topics"] == ["a"]
            missed = await published(ws, 5)
            assert [message["data"] for message in missed] == [2, 4, 5, 6, 7]
            assert [message["id"] for message in missed] == sorted(
                (message["id"] for message in missed), key=ids
            )
            hub.broadcast_to_subscribers("m", 8, "a")
            assert [message["data"] for message in await published(ws, 1)] == [8]
            await nothing_more(ws)


def ids(message_id: str) -> tuple[int, int]:
    milliseconds, sequence = message_id.split("-")
    return int(milliseconds), int(sequence)


async def test_runner_notifications_are_replayed(hub_server: Any) -> None:
    async with hub_server() as served:
        hub = served.hub
        last = await seen_id(served, "test:eth_call", lambda: hub.broadcast_to_all("m", 0))
        hub.notify_run_started("r-1", "eth_call")
        hub.notify_run_failed("r-1", "eth_call", "timeout")
        hub.notify_run_started("r-2", "eth_getLogs")
        async with client(served.url + f"?topics=test:eth_call&since={last}") as (ws, hello):
            assert hello["data"]["recovered"] is True
            missed = await published(ws, 2)
            assert [message["type"] for message in missed] == ["run_started", "run_failed"]
            await nothing_more(ws)


async def test_the_wildcard_resumes_everything(hub_server: Any) -> None:
    async with hub_server() as served:
        hub = served.hub
        last = await seen_id(served, "*", lambda: hub.broadcast_to_subscribers("m", 0, "x"))
        hub.broadcast_to_subscribers("m", 1, "y")
        hub.broadcast_to_all("m", 2)
        hub.broadcast_to_subscribers("m", 3, ["z", "x"])
        async with client(served.url + f"?since={last}") as (ws, hello):
            assert hello["data"]["topics"] == ["*"] and hello["data"]["recovered"] is True
            assert [message["data"] for message in await published(ws, 3)] == [1, 2, 3]


async def test_broadcast_to_all_messages_are_replayed_to_everyone(hub_server: Any) -> None:
    async with hub_server() as served:
        hub = served.hub
        async with (
            client(served.url + "?topics=a") as (a, _),
            client(served.url + "?topics=b") as (
                b,
                _,
            ),
        ):
            hub.broadcast_to_all("m", 0)
            [seen] = await published(a, 1)
            assert (await published(b, 1))[0]["id"] == seen["id"]
        hub.broadcast_to_all("m", 1)
        hub.broadcast_to_subscribers("m", 2, "a")
        hub.broadcast_to_all("m", 3)
        since = f"&since={seen['id']}"
        async with (
            client(served.url + "?topics=a" + since) as (a, hello_a),
            client(served.url + "?topics=b" + since) as (b, hello_b),
        ):
            assert hello_a["data"]["recovered"] and hello_b["data"]["recovered"]
            assert [message["data"] for message in await published(a, 3)] == [1, 2, 3]
            assert [message["data"] for message in await published(b, 2)] == [1, 3]
            await nothing_more(b)


async def test_a_replay_sends_the_very_bytes_of_the_live_message(hub_server: Any) -> None:
    async with hub_server() as served:
        hub = served.hub
        async with (
            client(served.url + "?topics=a") as (away, _),
            client(served.url + "?topics=a") as (live, _),
        ):
            hub.broadcast_to_subscribers("m", {"n": 0}, "a")
            last = json.loads(await away.recv())["id"]
            await live.recv()
            await away.close()
            data = {"n": 1, "text": "é ✓", "nested": [1.5, None, True], "long": "x" * 200}
            hub.broadcast_to_subscribers("m", data, "a")
            live_bytes = await asyncio.wait_for(live.recv(decode=False), TIMEOUT)
        async with client(served.url + f"?topics=a&since={last}") as (ws, _):
            replayed_bytes = await asyncio.wait_for(ws.recv(decode=False), TIMEOUT)
        assert isinstance(live_bytes, bytes) and replayed_bytes == live_bytes
        assert json.loads(replayed_bytes)["data"] == data


@pytest.mark.parametrize("how", ["url", "subscribe"])
async def test_publishes_during_the_resume_leave_no_gap_and_no_duplicate(
    hub_server: Any, how: str
) -> None:
    """A publisher publishes on every loop iteration (to the topic, and every fifth message
    to everyone) while a client disconnects, resumes and reads on; a client that stayed
    connected is the reference."""
    more = 200
    async with hub_server(history_size=100_000, client_buffer_size=100_000) as served:
        hub = served.hub
        stop = asyncio.Event()

        async def publish() -> None:
            n = 0
            while not stop.is_set():
                if n % 5 == 4:
                    hub.broadcast_to_all("m", n)
                else:
                    hub.broadcast_to_subscribers("m", n, "t")
                n += 1
                await asyncio.sleep(0)

        reference: list[str] = []

        async def stay(ws: ClientConnection) -> None:
            while True:
                reference.append((await recv_json(ws))["id"])

        async with client(served.url + "?topics=t") as (stayer, _):
            staying = asyncio.ensure_future(stay(stayer))
            publisher = asyncio.ensure_future(publish())
            try:
                before: list[str] = []
                async with client(served.url + "?topics=t") as (ws, _):
                    before = [message["id"] for message in await published(ws, 20)]
                if how == "url":
                    resumed = connect(served.url + f"?topics=t&since={before[-1]}")
                else:
                    resumed = connect(served.url + "?topics=")
                async with resumed as ws:
                    hello = await recv_json(ws)
                    if how == "url":
                        assert hello["data"]["recovered"] is True, hello
                    else:
                        assert "recovered" not in hello["data"]
                        await send_json(
                            ws,
                            {"type": "subscribe", "data": {"topics": ["t"], "since": before[-1]}},
                        )
                    # With subscribe, messages to everyone arrive live before the answer, and
                    # the replay of the topic's messages follows it: count from the answer.
                    after: list[str] = []
                    answered = how == "url"
                    counted = 0
                    while counted < more:
                        message = await recv_json(ws)
                        if message["type"] == "subscribed":
                            assert message["data"] == {"topics": ["t"], "recovered": True}
                            answered = True
                            continue
                        after.append(message["id"])
                        counted += answered
            finally:
                stop.set()
                await publisher
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TIMEOUT):
                    while after[-1] not in reference:
                        await asyncio.sleep(0.005)
            staying.cancel()
        start = reference.index(before[0])
        expected = reference[start : start + len(before) + len(after)]
        assert len(set(after)) == len(after)
        assert before + sorted(after, key=ids) == expected
        if how == "url":
            assert after == sorted(after, key=ids)  # and in publish order


async def test_history_overflow_is_not_recovered(hub_server: Any) -> None:
    async with hub_server(history_size=3) as served:
        hub = served.hub
        last = await seen_id(served, "a", lambda: hub.broadcast_to_subscribers("m", 0, "a"))
        for n in range(1, 6):
            hub.broadcast_to_subscribers("m", n, "a")
        async with client(served.url + f"?topics=a&since={last}") as (ws, hello):
            assert hello["data"]["recovered"] is False
            assert hello["data"]["reason"] == f"history does not reach back to {last}"
            # Nothing is replayed: live messages follow the greeting.
            hub.broadcast_to_subscribers("m", 6, "a")
            assert [message["data"] for message in await published(ws, 1)] == [6]
        # Exactly as far back as the history reaches is still recovered.
        async with client(served.url + "?topics=a") as (ws, _):
            await send_json(ws, {"type": "subscribe", "data": {"topics": ["a"], "since": last}})
            answer = await recv_json(ws)
            assert answer["data"]["recovered"] is False
        newest = (await hub.publish("m", 6.5, "b")).id  # the newest id, to nobody
        hub.broadcast_to_subscribers("m", 7, "a")
        async with client(served.url + f"?topics=a&since={newest}") as (ws, hello):
            assert hello["data"]["recovered"] is True
            assert [message["data"] for message in await published(ws, 1)] == [7]


async def test_expired_history_is_not_recovered(hub_server: Any) -> None:
    async with hub_server(history_ttl=0.05) as served:
        hub = served.hub
        last = await seen_id(served, "a", lambda: hub.broadcast_to_subscribers("m", 0, "a"))
        hub.broadcast_to_subscribers("m", 1, "a")
        await asyncio.sleep(0.2)
        async with client(served.url + f"?topics=a&since={last}") as (ws, hello):
            assert hello["data"]["recovered"] is False
            assert hello["data"]["reason"] == f"history does not reach back to {last}"
            await nothing_more(ws)


@pytest.mark.parametrize("config", [{"history_size": 0}, {"history_ttl": 0}])
async def test_disabled_history_is_not_recovered(hub_server: Any, config: dict[str, Any]) -> None:
    async with hub_server(**config) as served:
        hub = served.hub
        last = await seen_id(served, "a", lambda: hub.broadcast_to_subscribers("m", 0, "a"))
        hub.broadcast_to_subscribers("m", 1, "a")
        async with client(served.url + f"?topics=a&since={last}") as (ws, hello):
            assert hello["data"]["recovered"] is False
            assert hello["data"]["reason"] == "history is disabled"
            await send_json(ws, {"type": "subscribe", "data": {"topics": ["b"], "since": last}})
            answer = await recv_json(ws)
            assert answer["data"] == {
                "topics": ["a", "b"],
                "recovered": False,
                "reason": "history is disabled",
            }
            await nothing_more(ws)


@pytest.mark.parametrize("since", ["1-0", "99999999999999-0"])
async def test_an_id_this_hub_did_not_issue_is_not_recovered(hub_server: Any, since: str) -> None:
    async with hub_server() as served:
        served.hub.broadcast_to_all("m", 0)
        async with client(served.url + f"?since={since}") as (ws, hello):
            assert hello["data"]["recovered"] is False
            assert hello["data"]["reason"] == "unknown message id"
            await nothing_more(ws)


@pytest.mark.parametrize("since", ["abc", "1-2-3", "-1", "1-", 12, None, ["1-0"], "1" * 21 + "-0"])
async def test_a_malformed_since_gets_400_and_changes_nothing(hub_server: Any, since: Any) -> None:
    async with hub_server() as served, client(served.url + "?topics=a") as (ws, _):
        await send_json(ws, {"type": "subscribe", "data": {"topics": ["b"], "since": since}})
        error = await recv_json(ws)
        assert error["type"] == "error" and error["error"]["code"] == 400, error
        assert "since" in error["error"]["message"]
        [info] = served.hub.client_info()
        assert info["subscriptions"] == ["a"]
        await send_json(ws, {"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"


async def test_a_malformed_url_since_gets_400_after_a_plain_greeting(hub_server: Any) -> None:
    async with hub_server() as served:
        served.hub.broadcast_to_all("m", 0)
        async with client(served.url + "?topics=a&since=yesterday") as (ws, hello):
            assert hello["data"]["topics"] == ["a"]
            assert "recovered" not in hello["data"]
            error = await recv_json(ws)
            assert error["type"] == "error" and error["error"]["code"] == 400
            assert error["error"]["message"].startswith("?since= ignored")
            served.hub.broadcast_to_subscribers("m", 1, "a")
            assert [message["data"] for message in await published(ws, 1)] == [1]


async def test_subscribe_with_since_does_not_repeat_what_arrived_live(hub_server: Any) -> None:
    async with hub_server() as served:
        hub = served.hub
        last = await seen_id(served, "a", lambda: hub.broadcast_to_subscribers("m", 0, "a"))
        hub.broadcast_to_subscribers("m", 1, "a")  # missed
        hub.broadcast_to_all("m", 2)  # missed
        async with client(served.url + "?topics=b") as (ws, _):
            hub.broadcast_to_all("m", 3)  # arrives live
            hub.broadcast_to_subscribers("m", 4, "b")  # arrives live
            hub.broadcast_to_subscribers("m", 5, "a")  # not subscribed yet: missed
            assert [message["data"] for message in await published(ws, 2)] == [3, 4]
            await send_json(ws, {"type": "subscribe", "data": {"topics": ["a"], "since": last}})
            answer = await recv_json(ws)
            assert answer["type"] == "subscribed"
            assert answer["data"] == {"topics": ["a", "b"], "recovered": True}
            assert [message["data"] for message in await published(ws, 3)] == [1, 2, 5]
            await nothing_more(ws)


async def test_history_records_from_other_threads_in_order(hub_server: Any) -> None:
    async with hub_server() as served:
        hub = served.hub
        last = await seen_id(served, "a", lambda: hub.broadcast_to_subscribers("m", -1, "a"))

        def from_thread() -> None:
            for n in range(20):
                hub.publish_threadsafe("m", n, "a").result(TIMEOUT)

        thread = threading.Thread(target=from_thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        async with client(served.url + f"?topics=a&since={last}") as (ws, hello):
            assert hello["data"]["recovered"] is True
            assert [message["data"] for message in await published(ws, 20)] == list(range(20))


async def test_bad_url_topics_with_since_error_first_then_the_replay(hub_server: Any) -> None:
    async with hub_server() as served:
        hub = served.hub
        last = await seen_id(served, "a", lambda: hub.broadcast_to_all("m", 0))
        hub.broadcast_to_subscribers("m", 1, "a")
        hub.broadcast_to_all("m", 2)
        async with client(served.url + f"?topics={'t' * 257}&since={last}") as (ws, hello):
            assert hello["data"]["topics"] == [] and hello["data"]["recovered"] is True
            error = await recv_json(ws)
            assert error["type"] == "error" and error["error"]["message"].startswith("?topics=")
            # With no subscriptions, only what went to everyone is replayed.
            assert [message["data"] for message in await published(ws, 1)] == [2]
            await nothing_more(ws)
