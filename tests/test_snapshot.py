"""State on join over real sockets: ``?snapshot=1``, ``"snapshot": true`` in a subscribe, and
a resume that cannot be recovered falling back to a snapshot; every transport, both cores."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import ClientConnection

from wshub.backplane import MemoryBackplane, MemoryStream
from wshub.snapshot import Retained, Retention, Snapshot, State

from .helpers import SECRET, TIMEOUT, client, recv_json, send_json
from .test_resume import ids, nothing_more, published, seen_id


def state_of(messages: list[dict[str, Any]]) -> list[tuple[str, Any, str | None]]:
    return [(message["type"], message.get("data"), message.get("key")) for message in messages]


def publish_a_dashboard(hub: Any) -> None:
    """Two runs' progress (keyed), their events (not keyed), and traffic of another test."""
    hub.broadcast_to_subscribers("run_progress", 1, "test:a", key="run:1")
    hub.broadcast_to_subscribers("regression_detected", "r1", "test:a")
    hub.broadcast_to_subscribers("run_progress", 1, "test:a", key="run:2")
    hub.broadcast_to_subscribers("run_progress", 2, "test:a", key="run:1")
    hub.broadcast_to_subscribers("run_progress", 9, "test:b", key="run:3")
    hub.broadcast_to_subscribers("regression_detected", "r3", "test:b")
    hub.broadcast_to_all("new_run", "everyone")
    hub.broadcast_to_subscribers("run_progress", 2, "test:a", key="run:2")
    hub.broadcast_to_subscribers("run_complete", 3, "test:a", key="run:1")


A_STATE = [
    ("regression_detected", "r1", None),
    ("new_run", "everyone", None),
    ("run_progress", 2, "run:2"),
    ("run_complete", 3, "run:1"),
]


async def test_a_snapshot_shows_the_latest_of_every_key_and_the_events_then_live(
    hub_server: Any,
) -> None:
    async with hub_server() as served:
        hub = served.hub
        publish_a_dashboard(hub)
        async with client(served.url + "?topics=test:a&snapshot=1") as (ws, hello):
            assert hello["data"]["snapshot"] is True
            assert hello["data"]["snapshot_messages"] == 4
            assert "recovered" not in hello["data"]
            shown = await published(ws, 4)
            assert state_of(shown) == A_STATE
            assert [m["id"] for m in shown] == sorted((m["id"] for m in shown), key=ids)
            hub.broadcast_to_subscribers("run_progress", 3, "test:a", key="run:2")
            assert state_of(await published(ws, 1)) == [("run_progress", 3, "run:2")]
            await nothing_more(ws)
        # A client that does not ask gets nothing of it; "*" gets every test's state.
        async with client(served.url + "?topics=test:a") as (ws, hello):
            assert "snapshot" not in hello["data"]
            await nothing_more(ws)
        async with client(served.url + "?snapshot=true") as (ws, hello):
            assert hello["data"]["topics"] == ["*"]
            shown = await published(ws, hello["data"]["snapshot_messages"])
            assert state_of(shown) == [
                ("regression_detected", "r1", None),
                ("run_progress", 9, "run:3"),
                ("regression_detected", "r3", None),
                ("new_run", "everyone", None),
                ("run_complete", 3, "run:1"),
                ("run_progress", 3, "run:2"),
            ]
            await nothing_more(ws)


async def test_a_snapshot_sends_the_very_bytes_of_the_live_message(hub_server: Any) -> None:
    async with hub_server() as served, client(served.url + "?topics=a") as (live, _):
        served.hub.broadcast_to_subscribers("m", {"x": [1, 2]}, "a", key="k")
        sent = await live.recv()
        async with client(served.url + "?topics=a&snapshot=1") as (ws, _):
            assert await ws.recv() == sent


async def test_subscribing_with_snapshot_shows_the_state_of_the_topics_it_adds(
    hub_server: Any,
) -> None:
    async with hub_server() as served, client(served.url + "?topics=test:b") as (ws, _):
        hub = served.hub
        publish_a_dashboard(hub)
        # Received live: test:b's two messages and the one to everyone.
        assert len(await published(ws, 3)) == 3
        await send_json(
            ws, {"type": "subscribe", "data": {"topics": ["test:a", "test:b"], "snapshot": True}}
        )
        answer = await recv_json(ws)
        assert answer["type"] == "subscribed"
        assert answer["data"] == {
            "topics": ["test:a", "test:b"],
            "snapshot": True,
            "snapshot_messages": 3,
        }
        shown = await published(ws, 3)
        assert state_of(shown) == [m for m in A_STATE if m[1] != "everyone"]
        await nothing_more(ws)


async def test_snapshots_follow_live_publishing_with_no_gap_and_no_duplicate(
    hub_server: Any,
) -> None:
    """Clients join asking for a snapshot while another thread publishes keyed progress
    and events: each holds, for every key, the last value published, and every event after
    the first it was shown, each once and in id order."""
    count = 400
    async with hub_server(client_buffer_size=2 * count, snapshot_window=count) as served:
        hub = served.hub
        stop = threading.Event()

        def publisher() -> None:
            for n in range(count):
                hub.publish_threadsafe("run_progress", n, "a", key=f"run:{n % 3}").result(TIMEOUT)
                hub.publish_threadsafe("event", n, "a").result(TIMEOUT)
            stop.set()

        thread = threading.Thread(target=publisher)
        async with contextlib.AsyncExitStack() as stack:
            sockets: list[tuple[ClientConnection, dict[str, Any]]] = []
            thread.start()
            try:
                while not stop.is_set() and len(sockets) < 8:
                    url = served.url + "?topics=a&snapshot=1"
                    sockets.append(await stack.enter_async_context(client(url)))
            finally:
                await asyncio.to_thread(thread.join, TIMEOUT * 4)
            assert len(sockets) >= 2, "the publisher finished before two clients joined"
            hub.broadcast_to_subscribers("end", None, "a")
            for ws, hello in sockets:
                messages = []
                while (message := await recv_json(ws))["type"] != "end":
                    messages.append(message)
                seen = [m["id"] for m in messages]
                assert len(set(seen)) == len(seen)
                assert seen == sorted(seen, key=ids)
                latest = {m["key"]: m["data"] for m in messages if m.get("key")}
                assert latest == {f"run:{k}": max(range(k, count, 3)) for k in range(3)}
                events = [m["data"] for m in messages if m["type"] == "event"]
                assert events == list(range(events[0], count)), hello


async def test_an_unrecoverable_resume_falls_back_to_a_snapshot(hub_server: Any) -> None:
    async with hub_server(history_size=2) as served:
        hub = served.hub
        last = await seen_id(served, "test:a", lambda: hub.broadcast_to_all("m", 0))
        publish_a_dashboard(hub)
        async with client(served.url + f"?topics=test:a&since={last}&snapshot=1") as (ws, hello):
            assert hello["data"]["recovered"] is False
            assert hello["data"]["reason"] == f"history does not reach back to {last}"
            assert hello["data"]["snapshot"] is True
            assert state_of(await published(ws, 5)) == [("m", 0, None), *A_STATE]
            await nothing_more(ws)
            # In a subscribe too: what this connection got live is left out.
            hub.broadcast_to_subscribers("run_progress", 4, "test:b", key="run:3")
            await send_json(
                ws,
                {
                    "type": "subscribe",
                    "data": {"topics": ["test:b"], "since": last, "snapshot": True},
                },
            )
            answer = await recv_json(ws)
            assert answer["data"]["recovered"] is False
            assert answer["data"]["snapshot"] is True
            # The state of every topic it holds, as a replay would be: all but what reached
            # this connection live.
            assert state_of(await published(ws, 7)) == [
                ("m", 0, None),
                ("regression_detected", "r1", None),
                ("regression_detected", "r3", None),
                ("new_run", "everyone", None),
                ("run_progress", 2, "run:2"),
                ("run_complete", 3, "run:1"),
                ("run_progress", 4, "run:3"),
            ]
            await nothing_more(ws)


async def test_a_recovered_resume_replays_and_says_no_snapshot_was_needed(
    hub_server: Any,
) -> None:
    async with hub_server() as served:
        hub = served.hub
        last = await seen_id(served, "test:a", lambda: hub.broadcast_to_all("m", 0))
        hub.broadcast_to_subscribers("run_progress", 1, "test:a", key="run:1")
        hub.broadcast_to_subscribers("run_progress", 2, "test:a", key="run:1")
        async with client(served.url + f"?topics=test:a&since={last}&snapshot=1") as (ws, hello):
            assert hello["data"]["recovered"] is True
            assert hello["data"]["snapshot"] is False
            # Every message it missed, not only the latest of the key.
            assert state_of(await published(ws, 2)) == [
                ("run_progress", 1, "run:1"),
                ("run_progress", 2, "run:1"),
            ]
            await nothing_more(ws)


async def test_the_retention_settings_bound_what_a_snapshot_holds(hub_server: Any) -> None:
    async with hub_server(snapshot_window=2, snapshot_max_keys=2, client_buffer_size=3) as served:
        hub = served.hub
        for n in range(4):
            hub.broadcast_to_subscribers("event", n, "a")
            hub.broadcast_to_subscribers("progress", n, "a", key=f"run:{n}")
        assert (hub.stats()["retained_keys"], hub.stats()["retained_events"]) == (2, 2)
        async with client(served.url + "?topics=a&snapshot=1") as (ws, hello):
            # Two events and two keys retained; three fit the client's buffer.
            assert hello["data"]["snapshot_messages"] == 3
            assert hello["data"]["snapshot_omitted"] == 1
            assert state_of(await published(ws, 3)) == [
                ("progress", 2, "run:2"),
                ("event", 3, None),
                ("progress", 3, "run:3"),
            ]
            await nothing_more(ws)
    async with hub_server(snapshot_window=0, snapshot_key_ttl=0) as served:
        served.hub.broadcast_to_subscribers("event", 0, "a")
        served.hub.broadcast_to_subscribers("progress", 0, "a", key="run:0")
        async with client(served.url + "?topics=a&snapshot=1") as (ws, hello):
            assert (hello["data"]["snapshot"], hello["data"]["snapshot_messages"]) == (True, 0)
            await nothing_more(ws)


async def test_a_snapshot_shows_only_what_the_token_grants(hub_server: Any) -> None:
    token = jwt.encode(
        {"exp": int(time.time()) + 60, "topics": ["test:a"]}, SECRET, algorithm="HS256"
    )
    async with hub_server(auth_required=True, auth_secret=SECRET) as served:
        publish_a_dashboard(served.hub)
        url = served.url + f"?token={token}&topics=test:a,test:b&snapshot=1"
        async with client(url) as (ws, hello):
            assert hello["data"]["topics"] == ["test:a"]
            assert hello["data"]["snapshot_messages"] == 4
            forbidden = await recv_json(ws)
            assert forbidden["type"] == "error" and forbidden["error"]["code"] == 403
            assert state_of(await published(ws, 4)) == A_STATE
            await send_json(
                ws, {"type": "subscribe", "data": {"topics": ["test:b"], "snapshot": True}}
            )
            assert (await recv_json(ws))["error"]["code"] == 403
            answer = await recv_json(ws)
            assert answer["data"]["snapshot_messages"] == 0
            await nothing_more(ws)


@pytest.mark.parametrize("value", ["yes", "2", "on"])
async def test_a_malformed_url_snapshot_gets_an_error_and_no_snapshot(
    hub_server: Any, value: str
) -> None:
    async with hub_server() as served:
        publish_a_dashboard(served.hub)
        async with client(served.url + f"?topics=test:a&snapshot={value}") as (ws, hello):
            assert "snapshot" not in hello["data"]
            error = await recv_json(ws)
            assert error["type"] == "error" and error["error"]["code"] == 400
            assert error["error"]["message"].startswith("?snapshot= ignored")
            await nothing_more(ws)
        async with client(served.url + "?topics=test:a&snapshot=0") as (ws, hello):
            assert "snapshot" not in hello["data"]
            await nothing_more(ws)


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
async def test_a_malformed_subscribe_snapshot_gets_400_and_changes_nothing(
    hub_server: Any, value: Any
) -> None:
    async with hub_server() as served, client(served.url + "?topics=a") as (ws, _):
        await send_json(ws, {"type": "subscribe", "data": {"topics": ["b"], "snapshot": value}})
        error = await recv_json(ws)
        assert error["type"] == "error" and error["error"]["code"] == 400, error
        assert '"snapshot"' in error["error"]["message"]
        [info] = served.hub.client_info()
        assert info["subscriptions"] == ["a"]


async def test_hubs_on_one_stream_show_the_state_the_others_delivered(hub_server: Any) -> None:
    stream = MemoryStream()
    async with hub_server(backplane=MemoryBackplane(stream)) as first:
        async with client(first.url + "?topics=test:a") as (ws, _):
            publish_a_dashboard(first.hub)
            hub = first.hub
            hub.broadcast_to_subscribers("end", None, "test:a")
            while (await recv_json(ws))["type"] != "end":
                pass
        # A hub that joins the stream now delivered none of it: it restores the state.
        async with (
            hub_server(backplane=MemoryBackplane(stream)) as second,
            client(second.url + "?topics=test:a&snapshot=1") as (ws, hello),
        ):
            assert hello["data"]["snapshot_messages"] == 5
            assert state_of(await published(ws, 5)) == [*A_STATE, ("end", None, None)]
            await nothing_more(ws)


async def test_a_resume_read_from_the_stream_falls_back_to_a_snapshot(hub_server: Any) -> None:
    stream = MemoryStream(history_size=3)
    async with hub_server(backplane=MemoryBackplane(stream), history_size=3) as served:
        hub = served.hub
        async with client(served.url + "?topics=test:a") as (ws, _):
            await hub.publish("m", 0, "test:a")
            last = (await recv_json(ws))["id"]
        for n in range(1, 5):
            await hub.publish("run_progress", n, "test:a", key="run:1")
        async with client(served.url + f"?topics=test:a&since={last}&snapshot=1") as (ws, hello):
            assert hello["data"]["recovered"] is False
            assert hello["data"]["snapshot"] is True
            assert state_of(await published(ws, 2)) == [
                ("m", 0, None),
                ("run_progress", 4, "run:1"),
            ]
            await nothing_more(ws)


# The rule itself, sans I/O: wshub.snapshot.State.


def make_state(clock: list[float], **bounds: Any) -> State:
    retention = Retention(
        bounds.get("window", 3),
        bounds.get("window_ttl", 60.0),
        bounds.get("key_ttl", 60.0),
        bounds.get("max_keys", 3),
    )
    return State(retention, clock=lambda: clock[0])


def at(seconds: float, sequence: int = 0) -> str:
    """A message id published at ``seconds``."""
    return f"{int(seconds * 1000)}-{sequence}"


def test_a_key_keeps_its_latest_message_under_the_topics_it_has_now() -> None:
    clock = [100.0]
    state = make_state(clock)
    state.record(at(97), ["a"], "run:1", "a1")
    state.record(at(98), ["b"], "run:1", "b2")  # moved to another topic
    state.record(at(99), None, "all", "to everyone")
    assert state.snapshot(["a"]).items == ["to everyone"]
    assert state.snapshot(["b"]).items == ["b2", "to everyone"]
    assert state.snapshot(["*"]).items == ["b2", "to everyone"]
    assert state.keys == 2


def test_keys_and_events_expire_by_the_age_their_ids_give() -> None:
    clock = [100.0]
    state = make_state(clock, key_ttl=10.0, window_ttl=5.0)
    state.record(at(89), ["a"], "old", "old key")
    state.record(at(94), ["a"], None, "old event")
    state.record(at(96), ["a"], None, "new event")
    state.record(at(99), ["a"], "new", "new key")
    assert state.snapshot(["a"]).items == ["new event", "new key"]
    clock[0] = 110.0
    assert state.snapshot(["a"]).items == []
    assert len(state) == 0


def test_the_bounds_drop_the_least_recent_key_and_the_oldest_event() -> None:
    state = make_state([100.0], window=2, max_keys=2)
    for n in range(4):
        state.record(at(50, 2 * n), ["a"], None, f"event {n}")
        state.record(at(50, 2 * n + 1), ["a"], f"key {n % 3}", f"value {n}")
    # key 0 was published again (value 3) after key 1 and key 2: key 1 goes first.
    assert state.snapshot(["a"]).items == ["event 2", "value 2", "event 3", "value 3"]
    assert state.keys == 2


def test_a_snapshot_leaves_out_what_reached_the_client_otherwise() -> None:
    state = make_state([100.0], window=10)
    state.record(at(50, 0), ["a"], None, "a before")
    state.record(at(50, 1), ["b"], None, "b before")
    state.record(at(50, 2), ["a"], None, "a after")
    state.record(at(50, 3), ["b"], "k", "b after")
    state.record(at(50, 4), ["b"], None, "b later")
    found = state.snapshot(["a", "b"], delivered_after=at(50, 1), delivered_topics=["a"])
    assert found.items == ["a before", "b before", "b after", "b later"]
    assert state.snapshot(["a", "b"], until=at(50, 2)).items == [
        "a before",
        "b before",
        "a after",
    ]
    assert state.snapshot(["b"], limit=2) == Snapshot(["b after", "b later"], 1)


def test_merging_keeps_the_newest_of_each_key_and_each_event_once() -> None:
    state = make_state([100.0], window=3)
    state.record(at(50, 1), ["a"], "k", "held newer")
    state.record(at(50, 2), ["a"], None, "event 2")
    restored = [
        Retained((50_000, 0), at(50, 0), ("a",), "k", "restored older"),
        Retained((50_000, 0), at(50, 0), ("a",), None, "event 0"),
        Retained((50_000, 2), at(50, 2), ("a",), None, "event 2 again"),
        Retained((50_000, 3), at(50, 3), ("a",), "j", "restored key"),
    ]
    state.merge(restored)
    state.merge(restored)
    assert state.snapshot(["a"]).items == ["event 0", "held newer", "event 2", "restored key"]
    assert [entry.message_id for entry in state.retained()] == [
        at(50, 0),
        at(50, 1),
        at(50, 2),
        at(50, 3),
    ]


def test_no_retention_keeps_nothing() -> None:
    state = make_state([100.0], window=0, max_keys=0)
    state.record(at(50), ["a"], None, "event")
    state.record(at(51), ["a"], "k", "value")
    assert len(state) == 0 and state.snapshot(["*"]).items == []
