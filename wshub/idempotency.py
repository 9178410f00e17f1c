"""Idempotency keys: a publish retried with its key within the window is not delivered twice.

A publisher that was told "outcome unknown" (Redis froze after the command was sent, the
HTTP answer was lost) cannot know whether its message went out. Sending it again with the
same key is safe: the second publish answers the first one's id and delivers nothing.

The rule lives here for one process (a hub alone, hubs joined by a
:class:`~wshub.backplane.MemoryStream`); :class:`~wshub.redis_backplane.RedisBackplane`
applies the same rule inside Redis, atomically with the ``XADD``, so it holds across hubs.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_KEYS", "MAX_KEY_LENGTH", "IdempotencyKeys", "check_idempotency_key"]

#: Longest key accepted: a UUID, a hash or a "<run id>:<event>" fits with room to spare.
MAX_KEY_LENGTH: Final = 128
#: Most keys one process remembers. The window bounds them in time; this bounds them in
#: memory should publishers send more than this within one window (the oldest go first).
MAX_KEYS: Final = 100_000


def check_idempotency_key(key: object) -> str:
    """``key`` if it is a usable idempotency key.

    Raises:
        TypeError: ``key`` is not a string.
        ValueError: ``key`` is empty or longer than :data:`MAX_KEY_LENGTH` characters.
    """
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key must be a string, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"idempotency_key must be 1 to {MAX_KEY_LENGTH} characters, got {len(key)}"
        )
    return key


class IdempotencyKeys:
    """The ids of recent keyed publishes, each kept for ``window`` seconds.

    Args:
        window: Seconds a key is remembered after its first publish.
        max_keys: Most keys remembered at once.
        clock: Seconds; injectable for tests.
    """

    def __init__(
        self,
        window: float,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        # Insertion order is expiry order: every key lives exactly one window.
        self._ids: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._ids)

    def get(self, key: str) -> str | None:
        """The id published under ``key`` within the window, or None."""
        self._expire()
        found = self._ids.get(key)
        return found[0] if found is not None else None

    def put(self, key: str, message_id: str) -> None:
        """Remember that ``key`` was published as ``message_id``."""
        self._expire()
        self._ids[key] = (message_id, self._clock() + self.window)
        self._ids.move_to_end(key)
        while len(self._ids) > self.max_keys:
            self._ids.popitem(last=False)

    def _expire(self) -> None:
        ids = self._ids
        now = self._clock()
        while ids:
            _, (_, expires) = next(iter(ids.items()))
            if expires > now:
                break
            ids.popitem(last=False)
