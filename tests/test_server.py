"""The lean server under wshub.serve: fragments, control frames, deadlines, tasks and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import ssl
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.protocol import State

import wshub

from .helpers import TIMEOUT, client, recv_json, send_json, wait_until


async def test_fragmented_messages_are_assembled_and_answered(lean_server: Any) -> None:
    async with lean_server(default_topics=()) as served, client(served.url) as (ws, _):
        # websockets sends an iterable as one message in several frames.
        await ws.send(['{"type": "subscribe", ', '"data": {"topics": ', '["a", "b"]}}'])
        reply = await recv_json(ws)
        assert (reply["type"], reply["data"]["topics"]) == ("subscribed", ["a", "b"])
        await ws.send([b'{"type":', b' "ping"}'])  # binary fragments
        assert (await recv_json(ws))["type"] == "pong"
        assert served.hub.stats()["protocol_errors"] == 0


async def test_fragmented_message_over_max_message_size_closes_with_1009(
    lean_server: Any,
) -> None:
    async with lean_server(max_message_size=1024) as served, client(served.url) as (ws, _):
        # Every fragment is under the limit; the message is not.
        await ws.send(["x" * 600, "x" * 600, "x" * 600])
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await wait_until(lambda: served.hub.client_count == 0)


async def test_invalid_utf8_in_a_text_message_closes_with_1007(lean_server: Any) -> None:
    async with lean_server() as served, client(served.url) as (ws, _):
        # A websockets client cannot send a str that is not UTF-8; write the frame directly.
        async with ws.send_context():
            ws.protocol.send_text(b'{"type": "\xff"}')
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007


async def test_client_pings_get_pongs(lean_server: Any) -> None:
    async with lean_server() as served, client(served.url, ping_interval=None) as (ws, _):
        pong = await ws.ping(b"are you there")
        async with asyncio.timeout(TIMEOUT):
            await pong
        await send_json(ws, {"type": "ping"})  # and the connection carries on
        assert (await recv_json(ws))["type"] == "pong"


async def test_clients_that_answer_pings_stay_connected(lean_server: Any) -> None:
    async with (
        lean_server(ping_interval=0.05, pong_timeout=0.1) as served,
        client(served.url) as (ws, _),
    ):
        await asyncio.sleep(0.5)  # ten ping rounds
        assert served.hub.client_count == 1
        assert served.hub.broadcast_to_all("still", 1) == 1
        assert (await recv_json(ws))["type"] == "still"


async def test_pong_deadline_is_kept(lean_server: Any) -> None:
    async with (
        lean_server(ping_interval=0.2, pong_timeout=0.3, write_timeout=5.0) as served,
        client(served.url) as (ws, hello),
    ):
        connected = time.monotonic()
        session = served.hub.session(hello["client_id"])
        assert session is not None
        connection = session.transport  # the server side of the client's connection
        ws.transport.pause_reading()
        await wait_until(lambda: connection.state is not State.OPEN)
        # First ping within ping_interval, failed pong_timeout after it (plus slack).
        assert 0.3 <= time.monotonic() - connected < 0.2 + 0.3 + 0.3
        ws.transport.resume_reading()
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            1011,
            "keepalive ping timeout",
        )


async def test_talking_client_outlives_read_timeout_without_heartbeat(lean_server: Any) -> None:
    async with (
        lean_server(enable_ping_pong=False, read_timeout=0.3) as served,
        client(served.url, ping_interval=None) as (ws, _),
    ):
        for _ in range(6):  # 0.6 s in all, never silent for 0.3 s
            await asyncio.sleep(0.1)
            await send_json(ws, {"type": "pong"})
        assert served.hub.client_count == 1


async def test_handshake_that_never_completes_is_aborted_after_open_timeout(
    lean_server: Any,
) -> None:
    async with lean_server(open_timeout=0.3) as served:
        port = served.server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
            assert 0.25 <= time.monotonic() - started < 2.0
            assert served.hub.client_count == 0
        finally:
            writer.close()


async def test_leaving_serve_aborts_pending_handshakes(lean_server: Any) -> None:
    reader = writer = None
    started = 0.0
    async with lean_server(open_timeout=30.0) as served:
        port = served.server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)  # let the server accept it
        started = time.monotonic()
    assert time.monotonic() - started < 5.0  # not the 30 s handshake deadline
    try:
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
    finally:
        writer.close()


async def test_no_task_per_connection(lean_server: Any) -> None:
    async with lean_server(max_clients=100) as served:
        before = len(asyncio.all_tasks())
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(50):
                # ping_interval=None: a websockets client's keepalive would be a task too.
                await stack.enter_async_context(client(served.url, ping_interval=None))
            assert served.hub.client_count == 50
            await asyncio.sleep(0.05)
            assert len(asyncio.all_tasks()) == before
        await wait_until(lambda: served.hub.client_count == 0)


async def test_serve_refuses_websockets_server_options(implementation: str) -> None:
    hub = wshub.Hub(implementation=implementation)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="compression, ping_interval"):
        async with wshub.serve(hub, "127.0.0.1", 0, compression=None, ping_interval=1.0):
            pass
    assert not hub.running


async def test_tls(lean_server: Any, certificate: tuple[pathlib.Path, pathlib.Path]) -> None:
    cert, key = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    async with lean_server(serve_options={"ssl": server_context}) as served:
        url = served.url.replace("ws://", "wss://")
        async with client(url, ssl=client_context) as (ws, hello):
            assert hello["data"]["topics"] == ["*"]
            await send_json(ws, {"type": "ping"})
            assert (await recv_json(ws))["type"] == "pong"
            assert served.hub.broadcast_to_all("secret", {"n": 1}) == 1
            assert (await recv_json(ws))["data"] == {"n": 1}
            pong = await ws.ping()
            async with asyncio.timeout(TIMEOUT):
                await pong
        await wait_until(lambda: served.hub.client_count == 0)
        async with connect(url, ssl=client_context) as ws:
            json.loads(await ws.recv())
            await served.hub.stop()  # the 1001 goodbye over TLS
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_an_attached_client_keeps_what_the_hub_shows_of_its_handshake(
    lean_server: Any,
) -> None:
    extra = {"X-Forwarded-For": "203.0.113.7", "User-Agent": "dashboard/1.0"}
    async with (
        lean_server() as served,
        client(served.url + "?topics=a", additional_headers=extra) as (ws, hello),
    ):
        assert hello["data"]["topics"] == ["a"]
        [info] = served.hub.client_info()
        assert info["user_agent"] == "dashboard/1.0"
        host, port = ws.local_address[:2]
        assert info["remote_addr"] == f"{host}:{port}"
