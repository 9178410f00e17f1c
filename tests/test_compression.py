"""permessage-deflate over real sockets: one compression per message, shared by every client
that negotiated the hub's parameters, plain frames for the others, and bounded decompression of
what clients send."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
)

from wshub.bench.transports import COMPRESSING_TRANSPORTS
from wshub.compression import WINDOW_BITS

from .helpers import client, recv_json, send_json, subscribe, wait_until
from .memory import inflate, read_frames
from .raw import RawClient

# What the hub answers a client's offer, word for word.
ANSWER = (
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
    f"server_max_window_bits={WINDOW_BITS}"
)


def progress(number: int) -> dict[str, Any]:
    """A run_progress event of the size a dashboard gets (its envelope is about 300 bytes)."""
    return {
        "run_id": f"run-20261203-{number % 10:04d}",
        "test_name": "eth_getLogs",
        "progress": round(number / 100, 3),
        "elapsed_s": 12.5 + number,
        "requests_done": 15000 + 37 * number,
        "current_rps": 1234.5,
        "error_rate": 0.0012,
    }


def negotiated(ws: ClientConnection) -> list[Any]:
    return list(ws.protocol.extensions)


def answer(ws: ClientConnection) -> str | None:
    """The hub's ``Sec-WebSocket-Extensions``, None when it sent none."""
    assert ws.response is not None
    return ws.response.headers.get("Sec-WebSocket-Extensions")


@pytest.mark.parametrize("compression", ["off", "deflate"])
async def test_clients_that_offer_deflate_share_one_compression_per_message(
    hub_server: Any, transport: str, compression: str
) -> None:
    compresses = compression == "deflate" and transport in COMPRESSING_TRANSPORTS
    async with hub_server(compression=compression) as served, contextlib.AsyncExitStack() as stack:
        offering = [await stack.enter_async_context(client(served.url)) for _ in range(3)]
        plain, _ = await stack.enter_async_context(client(served.url, compression=None))
        hub = served.hub
        before = hub.stats()["messages_compressed"]
        events = [progress(number) for number in range(5)]
        for data in events:
            hub.broadcast_to_all("run_progress", data)
        for ws in [*(ws for ws, _ in offering), plain]:
            assert [(await recv_json(ws))["data"] for _ in events] == events
        stats = hub.stats()
        # Five compressions for three clients, not fifteen; none at all when off.
        assert stats["messages_compressed"] - before == (5 if compresses else 0)
        assert stats["compressed_clients"] == (3 if compresses else 0)
        shown = sorted(str(info["compression"]) for info in hub.client_info())
        assert shown == (["None", "deflate", "deflate", "deflate"] if compresses else ["None"] * 4)
        for ws, _ in offering:
            extensions = negotiated(ws)
            if compresses:
                assert answer(ws) == ANSWER
                assert len(extensions) == 1 and isinstance(extensions[0], PerMessageDeflate)
                assert extensions[0].remote_no_context_takeover  # the hub's side
                assert extensions[0].local_no_context_takeover  # the client's side
            else:
                assert extensions == []
        assert negotiated(plain) == []


async def test_each_large_message_is_one_compressed_frame_small_ones_go_plain(
    compressing_server: Any,
) -> None:
    async with (
        compressing_server(compression="deflate", compression_min_size=200) as served,
        RawClient.connect(served.url, extensions=[ClientPerMessageDeflateFactory()]) as raw,
    ):
        assert raw.response is not None
        assert raw.response.headers["Sec-WebSocket-Extensions"] == ANSWER
        greeting = await raw.next_message()
        assert greeting["type"] == "connection"
        hub = served.hub
        hub.broadcast_to_all("run_progress", progress(1))
        hub.broadcast_to_all("tick", {"n": 2})  # about 80 bytes: under the minimum
        hub.broadcast_to_all("run_progress", progress(3))
        received = [await raw.next_message() for _ in range(3)]
        assert [message["type"] for message in received] == [
            "run_progress",
            "tick",
            "run_progress",
        ]
        frames = read_frames(bytes(raw.wire.partition(b"\r\n\r\n")[2]))
        # The greeting (short) went plain too.
        flags = [compressed for compressed, _ in frames]
        assert flags == [False, True, False, True]
        texts = [inflate(body) if compressed else body for compressed, body in frames]
        assert [json.loads(text) for text in texts[1:]] == received


async def test_a_client_asking_for_a_smaller_window_gets_plain_frames(
    compressing_server: Any,
) -> None:
    offer = ClientPerMessageDeflateFactory(server_max_window_bits=WINDOW_BITS - 3)
    async with (
        compressing_server(compression="deflate") as served,
        client(served.url, extensions=[offer], compression=None) as (ws, _),
    ):
        # Negotiated as it asked, but the hub's shared frames use a larger window than it
        # decodes: it is sent plain frames, which every connection takes.
        assert f"server_max_window_bits={WINDOW_BITS - 3}" in str(answer(ws))
        served.hub.broadcast_to_all("run_progress", progress(1))
        assert (await recv_json(ws))["data"] == progress(1)
        assert [info["compression"] for info in served.hub.client_info()] == [None]
        assert served.hub.stats()["messages_compressed"] == 0


async def test_compressed_client_messages_are_understood(compressing_server: Any) -> None:
    async with (
        compressing_server(compression="deflate", default_topics=("a",)) as served,
        client(served.url) as (ws, _),
    ):
        # websockets compresses every message it sends once the extension is negotiated.
        assert await subscribe(ws, "runs", "b" * 200) == ["a", "b" * 200, "runs"]
        await send_json(ws, {"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"


async def test_a_decompression_bomb_is_closed_with_1009_and_others_are_served(
    compressing_server: Any,
) -> None:
    async with (
        compressing_server(compression="deflate", max_message_size=10_000) as served,
        client(served.url) as (bystander, _),
        client(served.url) as (ws, _),
    ):
        assert answer(ws) == ANSWER
        # A megabyte of one letter is about a kilobyte on the wire.
        await ws.send("a" * 1_000_000)
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1009
        await wait_until(lambda: served.hub.client_count == 1)
        served.hub.broadcast_to_all("after", {"n": 1})
        assert (await recv_json(bystander))["type"] == "after"


async def test_compression_off_never_answers_an_offer(compressing_server: Any) -> None:
    async with compressing_server(compression="off") as served, client(served.url) as (ws, _):
        assert answer(ws) is None
        served.hub.broadcast_to_all("run_progress", progress(1))
        assert (await recv_json(ws))["data"] == progress(1)
        assert served.hub.stats()["compressed_clients"] == 0
