"""Browsers' own WebSocket and EventSource against the hub: Chromium and Firefox negotiate
its permessage-deflate and decode every shared compressed frame, and follow its event stream,
resuming it with Last-Event-ID by themselves.

Each browser runs headless on a page of the test's own (an aiohttp server on 127.0.0.1) that
connects to the hub and posts back what it saw: the extensions the browser negotiated, then
every message up to an end marker. No driver is needed, so Firefox runs as it ships.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from .helpers import wait_until
from .test_compression import ANSWER, progress
from .tools import CHROMIUM_ARGS, require_chromium, require_firefox

REPORT_TIMEOUT = 60.0  # a browser's first start in a fresh profile is slow on a busy machine

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>wshub compression</title>
<script>
const hub = new URLSearchParams(location.search).get("hub");
const received = [];
const report = (body) => fetch("/report", { method: "POST", body: JSON.stringify(body) });
const ws = new WebSocket(hub);
ws.onmessage = (event) => {
  const message = JSON.parse(event.data);
  if (message.type === "connection") {
    report({ stage: "open", extensions: ws.extensions, client_id: message.data.client_id });
  } else if (message.type === "end") {
    report({ stage: "done", received });
  } else {
    received.push(message.data);
  }
};
ws.onclose = (event) => report({ stage: "closed", code: event.code });
</script>
"""

# The same with the browser's EventSource on the hub's event stream: it reconnects by
# itself when the stream ends, sending the id of the last record it saw as Last-Event-ID.
EVENT_SOURCE_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>wshub events</title>
<script>
const hub = new URLSearchParams(location.search).get("hub");
const received = [];
const report = (body) => fetch("/report", { method: "POST", body: JSON.stringify(body) });
const source = new EventSource(hub);
source.addEventListener("connection", (event) => {
  const greeting = JSON.parse(event.data).data;
  report({ stage: "open", client_id: greeting.client_id, recovered: greeting.recovered });
});
source.addEventListener("n", (event) => received.push(JSON.parse(event.data).data.n));
source.addEventListener("end", (event) => {
  report({ stage: "done", received, last: event.lastEventId });
  source.close();
});
</script>
"""


@contextlib.asynccontextmanager
async def report_page(
    html: str = PAGE,
) -> AsyncIterator[tuple[str, asyncio.Queue[dict[str, Any]]]]:
    """Serve ``html``; yields its URL and the queue of what it posts back."""
    reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        reports.put_nowait(json.loads(await request.read()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/report", report)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/", reports
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def browser(command: list[str]) -> AsyncIterator[None]:
    """Run a browser for the block; it and its child processes are killed at the end."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def launch(name: str, pytestconfig: pytest.Config, profile: Path, url: str) -> list[str]:
    if name == "firefox":
        path = require_firefox(pytestconfig)
        return [path, "--headless", "--no-remote", "--profile", str(profile), url]
    path = require_chromium(pytestconfig)
    return [path, *CHROMIUM_ARGS, f"--user-data-dir={profile}", url]


async def next_report(reports: asyncio.Queue[dict[str, Any]]) -> dict[str, Any]:
    async with asyncio.timeout(REPORT_TIMEOUT):
        return await reports.get()


@pytest.mark.parametrize("name", ["chromium", "firefox"])
async def test_browsers_negotiate_the_hubs_compression_and_decode_every_message(
    compressing_server: Any, pytestconfig: pytest.Config, tmp_path: Path, name: str
) -> None:
    async with (
        compressing_server(compression="deflate") as served,
        report_page() as (page, reports),
    ):
        profile = tmp_path / "profile"
        profile.mkdir()
        command = launch(name, pytestconfig, profile, f"{page}?hub={served.url}")
        async with browser(command):
            opened = await next_report(reports)
            assert opened["stage"] == "open", opened
            # Chromium shows the hub's whole answer, Firefox the extension's name alone.
            assert opened["extensions"] in (ANSWER, "permessage-deflate")
            hub = served.hub
            (info,) = [i for i in hub.client_info() if i["id"] == opened["client_id"]]
            assert info["compression"] == "deflate"
            assert ("Firefox/" if name == "firefox" else "Chrome/") in str(info["user_agent"])
            before = hub.stats()["messages_compressed"]
            # Run progress, and one message of a few hundred kilobytes (a whole run's
            # samples): far longer than the window it is compressed with.
            events: list[Any] = [progress(number) for number in range(30)]
            events.append({"samples": [progress(number) for number in range(2000)]})
            for data in events:
                hub.broadcast_to_all("run_progress", data)
            hub.broadcast_to_all("end")
            done = await next_report(reports)
            assert done["stage"] == "done", done
            assert done["received"] == events
            assert hub.stats()["messages_compressed"] - before == len(events)


@pytest.mark.parametrize("name", ["chromium", "firefox"])
async def test_browsers_follow_the_event_stream_and_resume_it_by_themselves(
    events_server: Any, pytestconfig: pytest.Config, tmp_path: Path, name: str
) -> None:
    async with events_server() as served, report_page(EVENT_SOURCE_PAGE) as (page, reports):
        stream = served.url.replace("ws://", "http://").replace("/api/ws", "/api/events")
        profile = tmp_path / "profile"
        profile.mkdir()
        async with browser(launch(name, pytestconfig, profile, f"{page}?hub={stream}")):
            hub = served.hub
            opened = await next_report(reports)
            assert opened["stage"] == "open", opened
            for n in range(3):
                hub.broadcast_to_all("n", {"n": n})
            # The hub ends the stream; what is published before the browser is back is
            # replayed from the Last-Event-ID it brings.
            session = hub.session(opened["client_id"])
            assert session is not None
            hub.flush()  # written before the close, which drops what is still queued
            session.transport.close(1012, "service restart")
            await wait_until(lambda: hub.client_count == 0)
            for n in range(3, 5):
                hub.broadcast_to_all("n", {"n": n})
            again = await next_report(reports)
            assert again["stage"] == "open" and again["recovered"] is True, again
            hub.broadcast_to_all("n", {"n": 5})
            last = hub.broadcast_to_all("end")
            done = await next_report(reports)
            assert done["received"] == [0, 1, 2, 3, 4, 5]
            assert last == 1
