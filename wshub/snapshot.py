"""State on join: what a client that asks for a snapshot is shown before live messages.

A hub retains, of what it delivered, the latest message of every ``key`` (the current
progress of each run, a finished run's final message) for ``snapshot_key_ttl`` seconds after
it was published, and the last ``snapshot_window`` messages without a key (the events: a
regression, a new run) for at most ``snapshot_window_ttl`` seconds. A client that joins with
``?snapshot=1``, or subscribes with ``"snapshot": true``, gets those of its topics in id
order, queued in the same synchronous step as its answer, so live messages follow with
neither gap nor duplicate.

:class:`State` is the one rule, for any kind of item: the hub keeps the core's ``Message``
(the very bytes it sent, shared), a :class:`~wshub.backplane.MemoryStream` keeps backplane
entries, and Redis applies the same bounds in the script that adds each entry, so a hub that
starts (or restarts) joined to Redis shows the state the others show.

Ages are read from the ids, which are the milliseconds of the publish, so what a hub restores
from Redis expires when it would have on the hub that delivered it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

from .config import HubConfig
from .history import missed

__all__ = ["Retained", "Retention", "Snapshot", "State"]

_Key = tuple[int, int]


class Retention(NamedTuple):
    """How much state is retained for snapshots (the ``snapshot_*`` settings).

    Attributes:
        window: Most messages without a key kept (``snapshot_window``); 0 keeps none.
        window_ttl: Seconds such a message is kept (``snapshot_window_ttl``); 0 keeps none.
        key_ttl: Seconds the latest message of a key is kept after it was published
            (``snapshot_key_ttl``); 0 keeps no keys.
        max_keys: Most keys kept (``snapshot_max_keys``); past it, the key published least
            recently is dropped.
    """

    window: int
    window_ttl: float
    key_ttl: float
    max_keys: int

    @classmethod
    def of(cls, config: HubConfig | None = None) -> Retention:
        """The retention a hub's settings give (the defaults when None)."""
        config = config if config is not None else HubConfig()
        return cls(
            config.snapshot_window,
            config.snapshot_window_ttl,
            config.snapshot_key_ttl,
            config.snapshot_max_keys,
        )

    @property
    def keeps_events(self) -> bool:
        """Messages without a key are retained."""
        return self.window > 0 and self.window_ttl > 0

    @property
    def keeps_keys(self) -> bool:
        """The latest message of each key is retained."""
        return self.key_ttl > 0 and self.max_keys > 0


class Retained(NamedTuple):
    """One retained message.

    Attributes:
        id: Its id as :func:`~wshub.wire.parse_message_id` gives it.
        message_id: Its id.
        topics: Its topics; None when it went to every client.
        key: Its key; None for an event.
        item: What is kept of it (the core's ``Message``, or a backplane ``Entry``).
    """

    id: _Key
    message_id: str
    topics: Sequence[str] | None
    key: str | None
    item: Any


class Snapshot(NamedTuple):
    """What :meth:`State.snapshot` found.

    Attributes:
        items: The retained items to send, oldest first.
        omitted: How many older ones were left out to fit the client's buffer.
    """

    items: list[Any]
    omitted: int


def _id_of(message_id: str) -> _Key:
    # Ids the hub issued or a backplane delivered: split, not matched against the pattern.
    milliseconds, _, sequence = message_id.partition("-")
    return int(milliseconds), int(sequence)


class State:
    """The latest message of every key and the recent messages without one.

    Recording is O(1) per topic of a message (references only); a snapshot costs what it
    returns plus a sort, since keys are indexed by topic (only a ``"*"`` client, who gets
    everything, walks them all).

    Args:
        retention: The bounds.
        clock: Wall-clock seconds (ages are measured against the ids); injectable for tests.
    """

    __slots__ = ("_by_topic", "_clock", "_events", "_keys", "_to_everyone", "retention")

    def __init__(self, retention: Retention, *, clock: Callable[[], float] = time.time) -> None:
        self.retention = retention
        self._clock = clock
        # Least recently published first, so expiry and the key bound look at the front only.
        self._keys: collections.OrderedDict[str, Retained] = collections.OrderedDict()
        self._by_topic: dict[str, dict[str, Retained]] = {}
        self._to_everyone: dict[str, Retained] = {}
        self._events: collections.deque[Retained] = collections.deque()

    def __len__(self) -> int:
        return len(self._keys) + len(self._events)

    @property
    def keys(self) -> int:
        """How many keys are retained."""
        return len(self._keys)

    @property
    def events(self) -> int:
        """How many messages without a key are retained."""
        return len(self._events)

    def record(
        self, message_id: str, topics: Sequence[str] | None, key: str | None, item: Any
    ) -> None:
        """Retain a message delivered now (ids increasing): it supersedes its key's last."""
        retention = self.retention
        if key is None:
            if not retention.keeps_events:
                return
            events = self._events
            events.append(Retained(_id_of(message_id), message_id, topics, None, item))
            if len(events) > retention.window:
                events.popleft()
            return
        if not retention.keeps_keys:
            return
        self._put(Retained(_id_of(message_id), message_id, topics, key, item))
        if len(self._keys) > retention.max_keys:
            self._drop(next(iter(self._keys)))

    def merge(self, retained: Iterable[Retained]) -> None:
        """Add what a backplane retained (a restart, or after a gap) to what is held here.

        An entry older than the one held for its key, or one already held, changes nothing,
        so merging the same state twice, or beside live deliveries, is harmless.
        """
        retention = self.retention
        events = {entry.id: entry for entry in self._events}
        for entry in retained:
            if entry.key is None:
                if retention.keeps_events:
                    events.setdefault(entry.id, entry)
                continue
            if not retention.keeps_keys:
                continue
            held = self._keys.get(entry.key)
            if held is not None and held.id >= entry.id:
                continue
            self._put(entry)
        if retention.keeps_events:
            newest = sorted(events.values(), key=_order)[-retention.window :]
            self._events = collections.deque(newest)
        # Keys in publish order again, so that the bounds drop the least recent first.
        ordered = sorted(self._keys.values(), key=_order)
        self._keys = collections.OrderedDict(
            (entry.key, entry) for entry in ordered if entry.key is not None
        )
        while len(self._keys) > retention.max_keys:
            self._drop(next(iter(self._keys)))

    def _put(self, entry: Retained) -> None:
        key = entry.key
        assert key is not None
        keys = self._keys
        held = keys.get(key)
        if held is not None and held.topics == entry.topics:
            # The common case (a run's next progress, to the same topics): replace in place.
            keys[key] = entry
            keys.move_to_end(key)
            if entry.topics is None:
                self._to_everyone[key] = entry
            else:
                by_topic = self._by_topic
                for topic in entry.topics:
                    by_topic[topic][key] = entry
            return
        if held is not None:
            self._drop(key)
        keys[key] = entry
        if entry.topics is None:
            self._to_everyone[key] = entry
            return
        by_topic = self._by_topic
        for topic in entry.topics:
            of_topic = by_topic.get(topic)
            if of_topic is None:
                of_topic = by_topic[topic] = {}
            of_topic[key] = entry

    def _drop(self, key: str) -> None:
        entry = self._keys.pop(key)
        if entry.topics is None:
            del self._to_everyone[key]
            return
        by_topic = self._by_topic
        for topic in entry.topics:
            keys = by_topic.get(topic)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del by_topic[topic]

    def expire(self) -> None:
        """Drop what has outlived its ttl; :meth:`snapshot` and :meth:`retained` do it first."""
        now_ms = self._clock() * 1000
        retention = self.retention
        key_deadline = now_ms - retention.key_ttl * 1000
        keys = self._keys
        while keys:
            key, oldest = next(iter(keys.items()))
            if oldest.id[0] > key_deadline:
                break
            self._drop(key)
        event_deadline = now_ms - retention.window_ttl * 1000
        events = self._events
        while events and events[0].id[0] <= event_deadline:
            events.popleft()

    def retained(self) -> list[Retained]:
        """Everything retained, oldest first."""
        self.expire()
        return sorted([*self._keys.values(), *self._events], key=_order)

    def snapshot(
        self,
        topics: Collection[str],
        *,
        delivered_after: str | None = None,
        delivered_topics: Collection[str] = (),
        until: str | None = None,
        limit: int | None = None,
    ) -> Snapshot:
        """The retained messages of ``topics``, oldest first.

        Args:
            topics: The client's topics: a message matches as it would live (a topic in
                common, ``"*"``, or sent to every client).
            delivered_after: The id after which the client's connection received messages
                of ``delivered_topics`` live: those are left out, as a resume leaves them.
            delivered_topics: The topics it held live meanwhile.
            until: Leave out messages after this id (they reach the client another way).
            limit: The most items returned: the newest, so the client's buffer holds them.
        """
        self.expire()
        if "*" in topics:
            keyed: Iterable[Retained] = self._keys.values()
        else:
            found = dict(self._to_everyone)
            by_topic = self._by_topic
            for topic in topics:
                keys = by_topic.get(topic)
                if keys is not None:
                    found.update(keys)
            keyed = found.values()
        skip_after = _id_of(delivered_after) if delivered_after is not None else None
        last = _id_of(until) if until is not None else None
        chosen = [
            entry
            for entry in (*keyed, *self._events)
            if (last is None or entry.id <= last)
            and missed(entry.id, entry.topics, topics, skip_after, delivered_topics)
        ]
        chosen.sort(key=_order)
        omitted = 0
        if limit is not None and len(chosen) > limit:
            omitted = len(chosen) - limit
            chosen = chosen[omitted:]
        return Snapshot([entry.item for entry in chosen], omitted)


def _order(entry: Retained) -> _Key:
    return entry.id
