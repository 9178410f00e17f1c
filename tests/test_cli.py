"""``python -m wshub serve`` as a user runs it: a real process, real clients, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedOK

from .helpers import client, recv_json

LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/api/ws")


@asynccontextmanager
async def wshub_serve(*arguments: str, **environment: str) -> AsyncIterator[tuple[Any, int]]:
    """Start ``python -m wshub serve`` on free ports; yields the process and its WS port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wshub",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--api-port",
        "0",
        *arguments,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **environment},
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            while not (match := LISTENING.search((await process.stderr.readline()).decode())):
                if process.returncode is not None:
                    raise AssertionError("wshub serve exited early")
        yield process, int(match.group(1))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_until_sigterm_then_close_clients_gracefully() -> None:
    async with wshub_serve("--max-clients", "5", WSHUB_DEFAULT_TOPICS="news") as (process, port):
        async with client(f"ws://127.0.0.1:{port}/api/ws") as (ws, hello):
            assert hello["data"]["topics"] == ["news"]
            process.send_signal(signal.SIGTERM)
            goodbye = await recv_json(ws)
            assert goodbye["type"] == "disconnection"
            with pytest.raises(ConnectionClosedOK) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        async with asyncio.timeout(20):
            assert await process.wait() == 0


async def test_json_logs() -> None:
    async with wshub_serve("--log-format", "json") as (process, port):
        async with client(f"ws://127.0.0.1:{port}/api/ws"):
            pass
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        async with asyncio.timeout(20):
            rest = (await process.stderr.read()).decode().splitlines()
            assert await process.wait() == 0
        entries = [json.loads(line) for line in rest if line.strip()]
        assert {"time", "level", "logger", "message"} <= set(entries[-1])
        assert any("disconnected" in entry["message"] for entry in entries)
        assert entries[-1]["message"] == "stopped"


async def test_bad_setting_stops_start_up_with_its_name() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wshub",
        "serve",
        "--ping-interval",
        "-1",
        stderr=asyncio.subprocess.PIPE,
    )
    _, error = await process.communicate()
    assert process.returncode == 2
    assert "ping_interval must be more than zero seconds" in error.decode()
    assert "--ping-interval" in error.decode()
