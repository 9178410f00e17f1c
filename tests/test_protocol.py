"""Client messages: every kind of bad input gets an error envelope and the client lives on."""

from __future__ import annotations

import time
from typing import Any

import pytest

from wshub.wire import MessageClock, MessageType, ProtocolError, parse_client_message

from .helpers import client, recv_json, send_json, subscribe

BAD_MESSAGES = {
    "invalid JSON": ("{not json", "not valid JSON"),
    "not an object": ("[1, 2]", "JSON object"),
    "missing type": ('{"data": {}}', 'no "type"'),
    "unknown type": ('{"type": "launch"}', "unknown message type"),
    "type not a string": ('{"type": 5}', "unknown message type"),
    "no data": ('{"type": "subscribe"}', '"topics"'),
    "topics not a list": ('{"type": "subscribe", "data": {"topics": "a"}}', "list"),
    "empty topic": ('{"type": "subscribe", "data": {"topics": [""]}}', "empty"),
    "topic not a string": ('{"type": "unsubscribe", "data": {"topics": [7]}}', "string"),
    "topic too long": (
        '{"type": "subscribe", "data": {"topics": ["' + "x" * 257 + '"]}}',
        "longer than 256",
    ),
}


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
async def test_bad_message_gets_error_envelope_and_connection_lives(
    hub_server: Any, name: str
) -> None:
    raw, expected = BAD_MESSAGES[name]
    async with hub_server() as served, client(served.url) as (ws, hello):
        await ws.send(raw)
        error = await recv_json(ws)
        assert error["type"] == "error"
        assert error["client_id"] == hello["client_id"]
        assert error["error"]["code"] == 400
        assert expected in error["error"]["message"]
        # Still subscribed as before, still answering.
        assert served.hub.broadcast_to_all("after", 1) == 1
        assert (await recv_json(ws))["type"] == "after"
        await send_json(ws, {"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"
        assert served.hub.stats()["protocol_errors"] == 1


async def test_binary_json_is_understood(hub_server: Any) -> None:
    async with hub_server() as served, client(served.url) as (ws, _):
        await ws.send(b'{"type": "ping"}')
        assert (await recv_json(ws))["type"] == "pong"


async def test_too_many_subscriptions_is_refused_whole(hub_server: Any) -> None:
    async with (
        hub_server(max_subscriptions=3, default_topics=("a",)) as served,
        client(served.url) as (ws, _),
    ):
        await send_json(ws, {"type": "subscribe", "data": {"topics": ["b", "c", "d"]}})
        error = await recv_json(ws)
        assert error["type"] == "error" and "too many subscriptions" in error["error"]["message"]
        assert error["error"]["details"] == {"limit": 3, "subscribed": 1, "requested": 3}
        assert await subscribe(ws, "b", "c", "a") == ["a", "b", "c"]


async def test_bad_input_does_not_hurt_other_clients(hub_server: Any) -> None:
    async with (
        hub_server() as served,
        client(served.url) as (bad, _),
        client(served.url) as (
            good,
            _,
        ),
    ):
        for _ in range(20):
            await bad.send("garbage")
        served.hub.broadcast_to_all("news", 1)
        assert (await recv_json(good))["data"] == 1
        received = [(await recv_json(bad))["type"] for _ in range(21)]
        assert sorted(received) == ["error"] * 20 + ["news"]


def test_parse_client_message_accepts_the_four_client_types() -> None:
    assert parse_client_message('{"type": "ping"}').type is MessageType.PING
    assert parse_client_message(b'{"type": "pong"}').type is MessageType.PONG
    request = parse_client_message('{"type": "subscribe", "data": {"topics": ["a", "a", "b"]}}')
    assert request.type is MessageType.SUBSCRIBE and request.topics == ("a", "b")
    with pytest.raises(ProtocolError):
        parse_client_message('{"type": "subscribed"}')  # a server type


def test_message_ids_increase_strictly_within_one_millisecond() -> None:
    clock = MessageClock()
    ids = [clock.next()[0] for _ in range(10_000)]
    pairs = [tuple(int(part) for part in message_id.split("-")) for message_id in ids]
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)
    assert abs(pairs[0][0] - time.time() * 1000) < 60_000


def test_message_type_has_the_seed_types_subscription_answers_gap_and_tokens() -> None:
    assert len(MessageType) == 21
    assert {
        "subscribed",
        "unsubscribed",
        "regression_detected",
        "run_progress",
        "gap",
        "refresh",
        "refreshed",
        "token_expired",
    } <= {str(member) for member in MessageType}
