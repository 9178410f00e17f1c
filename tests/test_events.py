"""Server-Sent Events over real sockets: ``GET /api/events`` on every transport that serves
it, read by aiohttp's HTTP client and by ``curl -N``."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.parse
from typing import Any, cast

import pytest

from wshub import mint_token

from .events import events_url, open_stream
from .helpers import SECRET, TIMEOUT, wait_until
from .raw import RawClient


def address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


async def test_a_stream_carries_each_message_as_id_event_and_envelope(events_server: Any) -> None:
    async with (
        events_server() as served,
        open_stream(events_url(served.url, "?topics=runs")) as stream,
    ):
        headers = stream.response.headers
        assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert headers["Cache-Control"] == "no-store"
        hub = served.hub
        hub.broadcast_to_subscribers("deploy", {"v": 1}, ["deploys"])  # not its topic
        hub.broadcast_to_subscribers("run_progress", {"progress": 0.5}, ["runs"], key="run:1")
        record, envelope = await stream.message()
        assert record["event"] == "run_progress"
        assert record["id"] == envelope["id"]
        assert envelope["data"] == {"progress": 0.5} and envelope["key"] == "run:1"
        (info,) = hub.client_info()
        assert info["subscriptions"] == ["runs"] and info["messages_sent"] == 2
        assert hub.stats()["clients"] == 1


@pytest.mark.parametrize("resume", ["Last-Event-ID", "since"])
async def test_last_event_id_or_since_resumes_exactly(events_server: Any, resume: str) -> None:
    async with events_server() as served:
        hub = served.hub
        async with open_stream(events_url(served.url)) as stream:
            hub.broadcast_to_all("n", {"n": 0})
            last = (await stream.message())[0]["id"]
        await wait_until(lambda: hub.client_count == 0)
        hub.broadcast_to_all("n", {"n": 1})  # missed while away
        hub.broadcast_to_all("n", {"n": 2})
        headers, query = (
            ({"Last-Event-ID": last}, "") if resume != "since" else ({}, f"?since={last}")
        )
        async with open_stream(events_url(served.url, query), headers) as stream:
            assert [(await stream.message())[1]["data"]["n"] for _ in range(2)] == [1, 2]
            hub.broadcast_to_all("n", {"n": 3})
            assert (await stream.message())[1]["data"]["n"] == 3


async def test_a_bad_last_event_id_is_an_error_record_and_the_stream_lives(
    events_server: Any,
) -> None:
    async with (
        events_server() as served,
        open_stream(events_url(served.url), {"Last-Event-ID": "yesterday"}) as stream,
    ):
        record, envelope = await stream.message()
        assert record["event"] == "error" and "id" not in record
        assert envelope["error"]["code"] == 400
        assert "Last-Event-ID ignored" in envelope["error"]["message"]
        served.hub.broadcast_to_all("after", None)
        assert (await stream.message())[0]["event"] == "after"


async def test_a_snapshot_comes_first_on_a_stream(events_server: Any) -> None:
    async with events_server() as served:
        hub = served.hub
        hub.broadcast_to_all("run_progress", {"progress": 0.2}, key="run:1")
        hub.broadcast_to_all("run_progress", {"progress": 0.4}, key="run:1")
        hub.broadcast_to_all("regression_detected", {"n": 1})
        async with open_stream(events_url(served.url, "?snapshot=1"), greeted=False) as stream:
            _, greeting = await stream.message()
            assert greeting["type"] == "connection" and greeting["data"]["snapshot"] is True
            shown = [(await stream.message())[1]["data"] for _ in range(2)]
            assert shown == [{"progress": 0.4}, {"n": 1}]


async def test_streams_are_admitted_as_websocket_clients_are(events_server: Any) -> None:
    async with events_server(auth_required=True, auth_secret=SECRET, max_clients=1) as served:
        url = events_url(served.url)
        async with open_stream(url, greeted=False) as refused:
            assert refused.response.status == 401
            assert "Bearer" in refused.response.headers["WWW-Authenticate"]
        token = mint_token(SECRET, sub="alice", topics=["runs"], ttl=600)
        async with open_stream(f"{url}?token={token}&topics=runs,secret") as stream:
            _, error = await stream.message()
            assert error["error"]["code"] == 403  # the topic its token does not grant
            # The one client the hub takes: a second stream (or a WebSocket) is refused.
            async with open_stream(
                url, {"Authorization": f"Bearer {token}"}, greeted=False
            ) as full:
                assert full.response.status == 503
            served.hub.broadcast_to_subscribers("run", {"n": 1}, ["runs"])
            assert (await stream.message())[1]["data"] == {"n": 1}
            assert served.hub.client_info()[0]["identity"] == "alice"


async def test_a_stream_that_stops_reading_is_closed_as_a_slow_consumer(
    events_server: Any,
) -> None:
    config = {
        "slow_client_policy": "disconnect",
        "socket_send_buffer": 4096,
        "max_buffered_bytes": 65536,
        "write_timeout": 1.0,
    }
    async with events_server(**config) as served:
        _, writer = await asyncio.open_connection(*address(served.url))
        writer.write(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        hub = served.hub
        await wait_until(lambda: hub.client_count == 1)
        cast(asyncio.Transport, writer.transport).pause_reading()  # never reads again
        # Until the kernel's buffers (which ASGI servers leave as they are) and then the
        # hub's bound are full: at most 20 MB.
        for n in range(20_000):
            hub.broadcast_to_all("bulk", {"n": n, "pad": "x" * 1000})
            await asyncio.sleep(0)  # a loop iteration per message, as a runner's pace
            if hub.stats()["slow_consumer_disconnects"]:
                break
        assert hub.stats()["slow_consumer_disconnects"] == 1
        await wait_until(lambda: hub.client_count == 0)
        # The hub serves on.
        async with open_stream(events_url(served.url)) as stream:
            hub.broadcast_to_all("after", None)
            assert (await stream.message())[0]["event"] == "after"
        writer.transport.abort()


async def test_a_quiet_stream_gets_heartbeats(events_server: Any) -> None:
    async with (
        events_server(ping_interval=0.05, pong_timeout=5) as served,
        open_stream(events_url(served.url)) as stream,
    ):
        assert await stream.record() == {"comment": "heartbeat"}
        assert await stream.record() == {"comment": "heartbeat"}


async def test_the_hub_stopping_ends_a_stream_with_a_close_record(events_server: Any) -> None:
    async with events_server() as served, open_stream(events_url(served.url)) as stream:
        await served.hub.stop()
        record, envelope = await stream.message()
        assert envelope["type"] == "disconnection"
        record, close = await stream.message()
        assert record["event"] == "close" and close == {"code": 1001, "reason": "server shutdown"}
        assert await stream.ended() == b""


async def test_other_requests_to_the_stream(events_server: Any) -> None:
    async with events_server() as served:
        url = events_url(served.url)
        async with RawClient.connect(url.replace("http://", "ws://")) as upgrade:
            assert upgrade.response is not None and upgrade.response.status_code == 404
        reader, writer = await asyncio.open_connection(*address(served.url))
        writer.write(b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 405") and b"allow: get" in head.lower()
        writer.close()


async def test_curl_follows_the_stream_and_resumes_with_last_event_id(events_server: Any) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not on the PATH", pytrace=False)

    async def follow(*extra: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            curl, "-sN", *extra, events_url(served.url), stdout=asyncio.subprocess.PIPE
        )

    async def lines_until(process: asyncio.subprocess.Process, text: str) -> list[str]:
        assert process.stdout is not None
        seen = []
        async with asyncio.timeout(TIMEOUT):
            while text not in (line := (await process.stdout.readline()).decode()):
                seen.append(line)
        return [*seen, line]

    async with events_server() as served:
        hub = served.hub
        first = await follow()
        await wait_until(lambda: hub.client_count == 1)
        hub.broadcast_to_all("run_progress", {"n": 1})
        shown = await lines_until(first, '"n":1')
        # What a person reads: each field on its own line.
        assert shown[-3].startswith("id: ") and shown[-2] == "event: run_progress\n"
        last = shown[-3].removeprefix("id: ").strip()
        first.kill()
        await first.wait()
        await wait_until(lambda: hub.client_count == 0)
        hub.broadcast_to_all("run_progress", {"n": 2})
        again = await follow("-H", f"Last-Event-ID: {last}")
        assert json.loads((await lines_until(again, '"n":2'))[-1].removeprefix("data: "))[
            "data"
        ] == {"n": 2}
        again.kill()
        await again.wait()


async def test_a_lean_server_without_the_stream_answers_404(lean_server: Any) -> None:
    async with (
        lean_server(serve_options={"events_path": None}) as served,
        open_stream(events_url(served.url), greeted=False) as stream,
    ):
        assert stream.response.status == 404
