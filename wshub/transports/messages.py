"""For transports whose library frames each message itself (:data:`FrameKind.TEXT_MESSAGES`).

ASGI servers, aiohttp and websockets' plain connections take one message per awaited
``send``; the fan-out core hands a client's queue over in one synchronous ``write``.
:class:`MessageSender` sits between the two: it keeps the messages of that ``write`` and sends
them in order from one task, and pauses the session while more than a transport's
high-water mark of them is waiting, exactly as an asyncio transport does for the lean server,
so a client that does not read is held to the hub's per-client bounds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from ..session import ClientSession

__all__ = ["HIGH_WATER", "LOW_WATER", "MessageSender"]

# The lean server's transports pause at 32 KiB (websockets' write_limit default) and resume at
# a quarter of it, as asyncio does.
HIGH_WATER = 2**15
LOW_WATER = HIGH_WATER // 4

logger = logging.getLogger("wshub")


class MessageSender:
    """Sends the messages the core hands over, one ``await send(payload)`` at a time.

    Args:
        send: Sends one message's JSON text (``bytes``); raises once the connection is gone.
        close: Closes the connection with a code and reason, after what was handed over.
        close_timeout: How long a close may take, sends before it included. Past it the
            session is told the connection ended (these libraries offer no abort; their own
            deadlines end the socket), so a client that reads nothing cannot pin the hub.
        gave_up: Called then, for the transport to stop serving the connection.
    """

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[object]],
        close: Callable[[int, str], Awaitable[object]],
        close_timeout: float,
        gave_up: Callable[[], object] | None = None,
    ) -> None:
        self._send = send
        self._gave_up = gave_up
        self._close = close
        self._close_timeout = close_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self.session: ClientSession | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._paused = False
        self._task: asyncio.Task[None] | None = None
        self._closing: tuple[int, str] | None = None
        self._failed = False

    def write(self, payloads: list[bytes]) -> None:
        """Take a client's queue from the core (its ``write``)."""
        if self._failed or self._closing is not None:
            raise ConnectionError("the connection is closing")
        self._queue.extend(payloads)
        self._queued_bytes += sum(len(payload) for payload in payloads)
        if self._queued_bytes > HIGH_WATER and not self._paused and self.session is not None:
            self._paused = True
            self.session.pause_writing()
        self._wake()

    def close(self, code: int, reason: str) -> None:
        """Close once what was handed over is sent (bounded by the library's own deadline)."""
        if self._closing is not None:
            return
        self._closing = (code, reason)
        if self.session is not None:
            self.session.closing()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._close_timeout, self._give_up)
        self._wake()

    def _give_up(self) -> None:
        self._deadline = None
        self.stop()
        if self.session is not None:
            self.session.closed(None, None)
        if self._gave_up is not None:
            self._gave_up()

    def buffered_bytes(self) -> int:
        """Bytes handed over and not yet sent."""
        return self._queued_bytes

    def stop(self) -> None:
        """The connection ended: send nothing more."""
        self._failed = True
        self._queue.clear()
        self._queued_bytes = 0
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._task is not None:
            self._task.cancel()

    def _wake(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        queue = self._queue
        try:
            while queue:
                payload = queue.popleft()
                self._queued_bytes -= len(payload)
                await self._send(payload)
                if self._paused and self._queued_bytes <= LOW_WATER:
                    self._paused = False
                    if self.session is not None and self._closing is None:
                        self.session.resume_writing()
            if self._closing is not None:
                await self._close(*self._closing)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The connection went away under us; its receive loop reports the end.
            logger.debug("sending to a client failed: %r", exc)
            self._failed = True
            queue.clear()
            self._queued_bytes = 0
