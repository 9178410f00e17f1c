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

import bisect
import collections
import heapq
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


class _Entry(NamedTuple):
    key: _Key  # the id, parsed once, so that finding a range costs no parsing
    message_id: str
    topics: Sequence[str] | None
    frame: Any
    stored_at: float


class MemoryHistory:
    """The last ``max_size`` published messages of this process, each kept ``ttl`` seconds.

    Appending is O(1) per topic of the message: an entry is a tuple of references (the
    message is shared, not copied), and eviction only ever looks at the oldest entry.
    ``max_size`` or ``ttl`` of 0 disables the history: nothing is kept and every resume is
    reported as not recovered.

    Besides the entries in id order, each topic has the entries published to it, and the
    messages to every client have theirs: a resume walks only the topics the client holds,
    from the newest back to its id, so it costs what it replays (plus a binary search), not a
    scan of the whole history; only a ``"*"`` subscriber, who gets everything, walks it all.

    Args:
        max_size: Most messages kept.
        ttl: Seconds a message is kept.
        clock: Monotonic seconds; injectable for tests.
    """

    __slots__ = (
        "_by_topic",
        "_clock",
        "_entries",
        "_evicted",
        "_to_everyone",
        "enabled",
        "max_size",
        "ttl",
    )

    def __init__(
        self, max_size: int, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self.enabled = max_size > 0 and ttl > 0
        self._clock = clock
        # Ids increase from left to right in every one of these.
        self._entries: collections.deque[_Entry] = collections.deque()
        self._by_topic: dict[str, collections.deque[_Entry]] = {}
        self._to_everyone: collections.deque[_Entry] = collections.deque()
        # The newest id that left the history: tells "too old" from "never issued".
        self._evicted: str | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, message_id: str, topics: Sequence[str] | None, frame: Any) -> None:
        """Record a published message (see :meth:`History.append`)."""
        if not self.enabled:
            return
        now = self._clock()
        # The hub's own id, well formed: split, not matched against the id pattern.
        milliseconds, _, sequence = message_id.partition("-")
        entry = _Entry((int(milliseconds), int(sequence)), message_id, topics, frame, now)
        entries = self._entries
        entries.append(entry)
        if topics is None:
            self._to_everyone.append(entry)
        else:
            by_topic = self._by_topic
            for topic in dict.fromkeys(topics):
                queue = by_topic.get(topic)
                if queue is None:
                    queue = by_topic[topic] = collections.deque()
                queue.append(entry)
        if len(entries) > self.max_size:
            self._evict()
        # Inline test of the oldest entry; _expire() runs only when something is due.
        if entries[0].stored_at <= now - self.ttl:
            self._expire(now)

    def _evict(self) -> None:
        """Drop the oldest entry, from the topics' queues too (it is the oldest there)."""
        entry = self._entries.popleft()
        self._evicted = entry.message_id
        if entry.topics is None:
            self._to_everyone.popleft()
            return
        by_topic = self._by_topic
        for topic in dict.fromkeys(entry.topics):
            queue = by_topic[topic]
            queue.popleft()
            if not queue:
                del by_topic[topic]

    def _expire(self, now: float) -> None:
        # Entries are in time order, so only the oldest needs looking at: amortized O(1).
        entries = self._entries
        deadline = now - self.ttl
        while entries and entries[0].stored_at <= deadline:
            self._evict()

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
        entries = self._entries
        position = bisect.bisect_left(entries, key, key=_key_of)
        if position < len(entries):
            if position > 0 and entries[position].key != key:
                # Between two ids this hub issued: not one of its ids.
                return Replay(False, "unknown message id", [])
            if position == 0 and entries[0].key != key:
                # Every retained message is newer than the id: did it leave the history?
                evicted = parse_message_id(self._evicted) if self._evicted is not None else None
                if evicted is None or key > evicted:
                    return Replay(False, "unknown message id", [])
                if key < evicted:
                    return Replay(False, f"history does not reach back to {message_id}", [])
        elif entries and entries[-1].key != key:
            return Replay(False, "unknown message id", [])  # after the newest
        elif not entries:
            evicted = parse_message_id(self._evicted) if self._evicted is not None else None
            if evicted != key:
                reason = (
                    f"history does not reach back to {message_id}"
                    if evicted is not None and key < evicted
                    else "unknown message id"
                )
                return Replay(False, reason, [])
        if "*" in topics:
            sources: list[collections.deque[_Entry]] = [entries]
        else:
            by_topic = self._by_topic
            sources = [self._to_everyone]
            sources += [by_topic[topic] for topic in topics if topic in by_topic]
        found = _merge([_newer_than(source, key) for source in sources])
        frames = [
            entry.frame
            for entry in found
            if missed(entry.key, entry.topics, topics, skip_after, delivered_topics)
        ]
        return Replay(True, None, frames)


def _key_of(entry: _Entry) -> _Key:
    return entry.key


def _newer_than(queue: collections.deque[_Entry], key: _Key) -> list[_Entry]:
    """The entries of ``queue`` after ``key``, oldest first: a walk back from the newest,
    so it costs what it returns."""
    newer = []
    for entry in reversed(queue):
        if entry.key <= key:
            break
        newer.append(entry)
    newer.reverse()
    return newer


def _merge(runs: list[list[_Entry]]) -> list[_Entry]:
    """Runs in id order merged into one, each message once (it may be in several topics)."""
    runs = [run for run in runs if run]
    if len(runs) == 1:
        return runs[0]
    merged: list[_Entry] = []
    last: _Key | None = None
    for entry in heapq.merge(*runs, key=_key_of):
        if entry.key != last:
            merged.append(entry)
            last = entry.key
    return merged
