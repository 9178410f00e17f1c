"""Tuples over a multiprocessing pipe, received as awaitables.

A thread reads the pipe and hands each message to the event loop. ``loop.add_reader`` would
be simpler, but the loop makes the descriptor non-blocking, and a large message could then be
written or read only in part.
"""

from __future__ import annotations

import asyncio
import threading
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Channel", "ChannelClosed"]


class ChannelClosed(ConnectionError):
    """The process at the other end went away."""


class Channel:
    """One end of a pipe, bound to the running event loop."""

    def __init__(self, pipe: Connection, name: str) -> None:
        self.pipe = pipe
        self.name = name
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._forward, args=(loop,), daemon=True).start()

    def _forward(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.pipe.recv()
            except (EOFError, OSError):
                message = ("gone",)
            try:
                loop.call_soon_threadsafe(self.inbox.put_nowait, message)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return
            if message[0] == "gone":
                return

    def send(self, *message: Any) -> None:
        self.pipe.send(message)

    async def next(self) -> tuple[Any, ...]:
        """The next message, whatever it is."""
        return await self.inbox.get()

    async def expect(self, kind: str, timeout: float) -> tuple[Any, ...]:
        """The next message of ``kind``; others are skipped.

        Raises:
            ChannelClosed: The other end closed or died first.
            TimeoutError: Nothing of ``kind`` within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while True:
                message = await self.inbox.get()
                if message[0] == kind:
                    return message
                if message[0] == "gone":
                    raise ChannelClosed(f"{self.name} went away")
