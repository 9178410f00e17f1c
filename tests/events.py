"""A Server-Sent Events client for the tests: aiohttp's HTTP client, records read as an
``EventSource`` reads them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from .helpers import TIMEOUT


def events_url(ws_url: str, query: str = "") -> str:
    """The event stream beside the WebSocket endpoint ``ws_url``."""
    base = ws_url.replace("ws://", "http://", 1).removesuffix("/api/ws")
    return f"{base}/api/events{query}"


class EventReader:
    """One open stream: :meth:`record` reads the next record, field by field.

    Attributes:
        response: The HTTP response, its headers read.
    """

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def record(self, timeout: float = TIMEOUT) -> dict[str, str]:
        """The next record: its fields (``data`` lines joined by ``\\n``); a comment is
        ``{"comment": text}``. Fails the test at the end of the stream."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    raise AssertionError(f"the stream ended; read so far: {fields}")
                line = raw.decode().rstrip("\n")
                if not line:
                    if fields:
                        return fields
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if not name:
                    return {"comment": value}
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value

    async def message(self, timeout: float = TIMEOUT) -> tuple[dict[str, str], dict[str, Any]]:
        """The next record that is not a comment, and its envelope decoded."""
        while "comment" in (record := await self.record(timeout)):
            pass
        envelope: dict[str, Any] = json.loads(record["data"])
        return record, envelope

    async def ended(self, timeout: float = TIMEOUT) -> bytes:
        """Everything left until the hub ends the stream."""
        async with asyncio.timeout(timeout):
            return await self.response.content.read()


@contextlib.asynccontextmanager
async def open_stream(
    url: str, headers: Mapping[str, str] | None = None, *, greeted: bool = True
) -> AsyncIterator[EventReader]:
    """``GET url``; yields the stream once its ``connection`` record is read (``greeted``),
    or at once (an error status is the caller's to check)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as response,
    ):
        reader = EventReader(response)
        if greeted:
            assert response.status == 200, await response.text()
            record, envelope = await reader.message()
            assert record["event"] == "connection" and "id" not in record, record
            assert envelope["type"] == "connection"
        yield reader
