"""Slow consumers: what happens to a client that cannot keep up.

Two things can go wrong, and the core reports both:

- its buffer overflows (more than ``client_buffer_size`` messages or ``max_buffered_bytes``
  queued): ``slow_client_policy="conflate"`` (the default) lets a message with a ``key``
  supersede the older one with the same key still queued, so the client holds the latest of
  every key; ``"drop_oldest"`` lets the core drop the oldest frames and count them;
  ``"disconnect"`` makes the core give up on the client, and this module closes it with 4008.
  Under ``"conflate"``, a buffer that messages without a key, and one per key, fill closes
  the client with 4008 too: a client never loses an event without being told;
- its transport stays unwritable (paused) for ``write_timeout``: it is closed with 4008,
  whatever the policy, since its socket is not draining at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from .config import HubConfig
from .logs import RateLimitedLog

__all__ = ["SLOW_CONSUMER_CLOSE_CODE", "SlowConsumers"]

SLOW_CONSUMER_CLOSE_CODE = 4008


class SlowConsumers:
    """Applies the slow-consumer policy; its methods are the core's callbacks.

    Args:
        config: ``slow_client_policy`` and ``write_timeout``.
        logger: Where disconnects are logged.
        sessions: The connected clients by id (the core reports core clients).
        close: Closes a client's session with a code and reason.
    """

    def __init__(
        self,
        config: HubConfig,
        logger: logging.Logger | logging.LoggerAdapter[Any] | RateLimitedLog,
        sessions: Mapping[str, Any],
        close: Callable[[Any, int, str], None],
    ) -> None:
        self.write_timeout = config.write_timeout
        self.logger = logger
        self.sessions = sessions
        self.close = close
        self.disconnects = 0
        # Clients whose transport is not writable, with the deadline that closes them.
        self.waiting: dict[str, asyncio.TimerHandle] = {}
        self._drained: asyncio.Event | None = None

    @staticmethod
    def core_policy(core: ModuleType, config: HubConfig) -> int:
        """The core's constant for ``slow_client_policy``."""
        policies = {
            "disconnect": core.DISCONNECT,
            "drop_oldest": core.DROP_OLDEST,
            "conflate": core.CONFLATE,
        }
        policy: int = policies[config.slow_client_policy]
        return policy

    def overflowed(self, client: Any) -> None:
        """The core gave up on ``client``: its buffer overflowed under "disconnect"."""
        self.disconnect(client.client_id, "its buffer overflowed")

    def blocked(self, client: Any) -> None:
        """The core holds frames for ``client`` until its transport is writable again."""
        client_id = client.client_id
        if client_id in self.waiting or client_id not in self.sessions:
            return
        loop = asyncio.get_running_loop()
        self.waiting[client_id] = loop.call_later(self.write_timeout, self._expired, client_id)

    def unblocked(self, client_id: str) -> None:
        """The client's transport is writable again (or the client left)."""
        deadline = self.waiting.pop(client_id, None)
        if deadline is not None:
            deadline.cancel()
            if not self.waiting and self._drained is not None:
                self._drained.set()

    async def wait_drained(self, timeout: float) -> None:
        """Return once no client waits for its transport, or after ``timeout``."""
        if not self.waiting:
            return
        self._drained = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            pass
        finally:
            self._drained = None

    def _expired(self, client_id: str) -> None:
        self.unblocked(client_id)
        self.disconnect(client_id, f"its transport did not drain in {self.write_timeout}s")

    def disconnect(self, client_id: str, why: str) -> None:
        """Close a client as a slow consumer (4008), counted and logged with ``why``."""
        session = self.sessions.get(client_id)
        if session is None:
            return
        self.disconnects += 1
        self.logger.warning("closing slow client %s: %s", client_id, why)
        self.close(session, SLOW_CONSUMER_CLOSE_CODE, "slow consumer")
