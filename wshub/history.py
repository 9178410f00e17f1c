"""Bounded history of published messages, for clients that resume after a disconnect.

The hub records every published message here with its id, its topics and the core's
``Message`` (the serialized envelope and the frames already built of it), so a replay
re-sends the very same bytes without serializing or framing again. The
history is bounded by a count and an age; what a client asks for that has left it is
reported as not recovered, so the client knows to refetch.

:class:`History` is the small interface the hub uses; :class:`MemoryHistory` keeps the
messages of one hub process. With a :class:`~wshub.redis_backplane.RedisBackplane` each hub still
keeps this history of what it delivered, for fast resumes, and what it does not hold is read
from the Redis stream, whose entry ids are of the same form.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple, Protocol

from .wire import parse_message_id

__all__ = ["History", "MemoryHistory", "Replay", "missed"]

_Key = tuple[int, int]


class Replay(NamedTuple):
    """What :meth:`History.since` found.

    Attributes:
        recovered: True when every message after the id is still known, so ``frames`` is
            exactly what the client missed.
        reason: Why not, for people (None when recovered).
        frames: The retained messages (the core's ``Message``) after the id that match,
            oldest first.
    """

    recovered: bool
    reason: str | None
    frames: list[Any]


class History(Protocol):
    """What the hub needs from a message history."""

    def append(self, message_id: str, topics: Sequence[str] | None, frame: Any) -> None:
        """Record a published message: its id, its topics (None: to every client), the
        core's ``Message`` of it.

        Called once per publish, in id order; must be O(1) and must not copy ``frame``.
        """
        ...

    def since(
        self,
        message_id: str,
        topics: Collection[str],
        *,
        delivered_after: str | None = None,
        delivered_topics: Collection[str] = (),
    ) -> Replay:
        """The retained messages after ``message_id`` that match ``topics``, oldest first.

        A message matches when it went to every client, when ``topics`` holds ``"*"``, or
        when one of its topics is in ``topics``. Messages after ``delivered_after`` that
        matched ``delivered_topics`` (or went to every client) already reached the client on
        its current connection and are left out, so a replay never repeats them.

        Raises:
            ProtocolError: ``message_id`` or ``delivered_after`` is not of the id form.
        """
        ...


def _matches(message_topics: Sequence[str] | None, topics: Collection[str]) -> bool:
    if message_topics is None or "*" in topics:
        return True
    return any(topic in topics for topic in message_topics)


def missed(
    key: _Key,
    message_topics: Sequence[str] | None,
    topics: Collection[str],
    delivered_after: _Key | None,
    delivered_topics: Collection[str],
) -> bool:
    """Whether a resuming client missed the message ``key``: the rule of :meth:`History.since`.

    Args:
        key: The message id as :func:`~wshub.wire.parse_message_id` gives it.
        message_topics: Its topics; None when it went to every client.
        topics: The client's topics now.
        delivered_after: The id after which the client's connection received messages live.
        delivered_topics: The topics it held live meanwhile.
    """
    if not _matches(message_topics, topics):
        return False
    return not (
        delivered_after is not None
        and key > delivered_after
        and _matches(message_topics, delivered_topics)
    )


class MemoryHistory:
    """The last ``max_size`` published messages of this process, each kept ``ttl`` seconds.

    Appending is O(1): an entry is a tuple of references (the message is shared, not copied),
    and eviction only ever looks at the oldest entry. ``max_size`` or ``ttl`` of 0 disables
    the history: nothing is kept and every resume is reported as not recovered.

    Args:
        max_size: Most messages kept.
        ttl: Seconds a message is kept.
        clock: Monotonic seconds; injectable for tests.
    """

    __slots__ = ("_clock", "_entries", "_evicted", "enabled", "max_size", "ttl")

    def __init__(
        self, max_size: int, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self.enabled = max_size > 0 and ttl > 0
        self._clock = clock
        # (id, topics, message, stored at); ids increase from left to right.
        self._entries: collections.deque[tuple[str, Sequence[str] | None, Any, float]] = (
            collections.deque()
        )
        # The newest id that left the history: tells "too old" from "never issued".
        self._evicted: str | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, message_id: str, topics: Sequence[str] | None, frame: Any) -> None:
        """Record a published message (see :meth:`History.append`)."""
        if not self.enabled:
            return
        now = self._clock()
        entries = self._entries
        entries.append((message_id, topics, frame, now))
        if len(entries) > self.max_size:
            self._evicted = entries.popleft()[0]
        # Inline test of the oldest entry; _expire() runs only when something is due.
        if entries[0][3] <= now - self.ttl:
            self._expire(now)

    def _expire(self, now: float) -> None:
        # Entries are in time order, so only the oldest needs looking at: amortized O(1).
        entries = self._entries
        deadline = now - self.ttl
        while entries and entries[0][3] <= deadline:
            self._evicted = entries.popleft()[0]

    def since(
        self,
        message_id: str,
        topics: Collection[str],
        *,
        delivered_after: str | None = None,
        delivered_topics: Collection[str] = (),
    ) -> Replay:
        """The retained messages after ``message_id`` (see :meth:`History.since`)."""
        key = parse_message_id(message_id)
        skip_after: _Key | None = (
            parse_message_id(delivered_after) if delivered_after is not None else None
        )
        if not self.enabled:
            return Replay(False, "history is disabled", [])
        self._expire(self._clock())
        frames: list[Any] = []
        # Newest first, down to the client's id: the cost follows what is replayed.
        for entry_id, entry_topics, frame, _ in reversed(self._entries):
            entry_key = parse_message_id(entry_id)
            if entry_key <= key:
                if entry_key != key:  # between two ids this hub issued, or after the newest
                    return Replay(False, "unknown message id", [])
                break
            if missed(entry_key, entry_topics, topics, skip_after, delivered_topics):
                frames.append(frame)
        else:
            # Every retained message is newer than the id: did it leave the history?
            evicted = parse_message_id(self._evicted) if self._evicted is not None else None
            if evicted is None or key > evicted:
                return Replay(False, "unknown message id", [])
            if key < evicted:
                return Replay(False, f"history does not reach back to {message_id}", [])
        frames.reverse()
        return Replay(True, None, frames)
