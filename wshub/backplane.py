from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, Protocol

from .idempotency import IdempotencyKeys
from .snapshot import Retention, State
from .wire import MessageClock, parse_message_id

__all__ = [
    "MIN_STREAM_LENGTH",
    "NOT_PUBLISHED",
    "UNKNOWN",
    "Added",
    "Backplane",
    "BackplaneUnavailable",
    "Deliver",
    "Entry",
    "MemoryBackplane",
    "MemoryStream",
    "Missed",
    "StoredEntries",
    "stored_since",
]

#: Fewest entries the stream keeps, even with the history disabled, so a hub that falls
#: briefly behind still finds what it has not read.
MIN_STREAM_LENGTH: Final = 10_000


#: :attr:`BackplaneUnavailable.outcome` of a message that never left the hub.
NOT_PUBLISHED: Final = "not_published"
#: :attr:`BackplaneUnavailable.outcome` of a message that may have reached the store: its
#: command was sent and no answer came. Publish it again with the same idempotency key.
UNKNOWN: Final = "unknown"


class BackplaneUnavailable(RuntimeError):
    """The backplane could not take a publish (Redis is unreachable or stopped answering).

    Args:
        message: Why, for people.
        outcome: :data:`NOT_PUBLISHED` when the message never left this hub (the store was
            known to be down, or the hub stopped first); :data:`UNKNOWN` when it was sent
            and no answer came, so the store may have taken it and deliver it after all.

    Attributes:
        outcome: As given.
    """

    def __init__(self, message: str, outcome: str = NOT_PUBLISHED) -> None:
        super().__init__(message)
        self.outcome = outcome


class Added(NamedTuple):
    """What the store did with a publish.

    Attributes:
        message_id: The message's id; for a duplicate, the id of the first publish.
        duplicate: True when its idempotency key was published within the window already,
            so this one was not added and will not be delivered.
    """

    message_id: str
    duplicate: bool = False


class Entry(NamedTuple):
    """One published message as the backplane carries it.

    Attributes:
        message_id: The global id, ``"<milliseconds>-<sequence>"``.
        message_type: The envelope's ``type``.
        data: The envelope's ``data`` as JSON, or None.
        topics: The topics it was published to; None when it goes to every client.
        origin: An opaque token of the publishing hub, so it knows its own messages.
        key: The message's conflation key, or None.
    """

    message_id: str
    message_type: str
    data: bytes | None
    topics: tuple[str, ...] | None
    origin: str | None
    key: str | None = None


class StoredEntries(NamedTuple):
    """What :meth:`Backplane.entries` found.

    Attributes:
        recovered: True when every message after the id is still stored.
        reason: Why not, for people (None when recovered).
        entries: The stored entries after the id, oldest first.
    """

    recovered: bool
    reason: str | None
    entries: list[Entry]


Deliver = Callable[[Entry], None]
#: Told when messages left the store before this hub read them: how many (None when the
#: store cannot tell) and an id they came after (what was delivered since may lack them).
Missed = Callable[[int | None, str], None]


class Backplane(Protocol):
    """What a hub needs from a shared backplane."""

    @property
    def ready(self) -> bool:
        """True while publishes can be taken and entries are being read."""
        ...

    @property
    def position(self) -> str:
        """The id of the last entry given to ``deliver``; before any, the newest id stored
        when reading began (``"0-0"`` until then)."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why the store was last found unreachable; None while it answers."""
        ...

    async def start(self, deliver: Deliver, missed: Missed | None = None) -> None:
        """Begin reading: ``deliver`` gets every entry published from now on, in order, and
        ``missed`` hears of every entry that left the store before it could be delivered.

        "From now on" is this call's time even when the store cannot be reached yet: what
        other hubs publish before this one first reaches it is delivered too.

        Returns after the first attempt to reach the store, whether it answered or not:
        :attr:`ready` tells, and reading goes on in the background either way.
        """
        ...

    async def close(self) -> None:
        """Stop reading; publishes still waiting fail with :class:`BackplaneUnavailable`."""
        ...

    def publish(
        self,
        message_type: str,
        data: bytes | None,
        topics: Sequence[str] | None,
        origin: str | None = None,
        idempotency_key: str | None = None,
        key: str | None = None,
    ) -> asyncio.Future[Added]:
        """Queue a message for the store, in call order; the future gets what was added.
        ``key`` is the message's conflation key, carried with it to every hub.

        With ``idempotency_key``, a key the store took within its idempotency window makes
        this publish a duplicate: not added, answered with the first one's id.

        Raises:
            BackplaneUnavailable: At once when the store is known to be unreachable
                (:data:`NOT_PUBLISHED`); through the future when it fails while the message
                is on its way (:data:`UNKNOWN` once it may have been sent).
        """
        ...

    async def entries(self, after: str, until: str) -> StoredEntries:
        """The stored entries after ``after`` up to ``until`` included, oldest first.

        Raises:
            BackplaneUnavailable: The store cannot be asked.
        """
        ...

    async def retained(self) -> list[Entry]:
        """What the store retains for snapshots (:mod:`wshub.snapshot`): the latest entry
        of every key still current and the recent entries without a key, oldest first.

        Raises:
            BackplaneUnavailable: The store cannot be asked.
        """
        ...

    async def share_audience(self, node: str, report: bytes, ttl: float) -> None:
        """Keep ``report`` (:mod:`wshub.audience`) as hub ``node``'s for ``ttl`` seconds.

        Raises:
            BackplaneUnavailable: The store cannot be asked.
        """
        ...

    async def audiences(self) -> dict[str, bytes]:
        """The reports every hub shared that are still current, by hub.

        Raises:
            BackplaneUnavailable: The store cannot be asked.
        """
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: disconnects, failed publishes and the like."""
        ...


def stored_since(
    after: str,
    until: str,
    *,
    newest: str,
    oldest: str | None,
    holds_after: bool,
    following: Sequence[Entry],
    history_size: int,
) -> StoredEntries:
    """The resume rule every backplane applies to what its stream holds.

    A stream is trimmed from its oldest end and leaves no trace of what it removed, so an id
    it no longer holds is known to be covered only when it is the newest: after an older one,
    messages may have been trimmed too, and that case errs towards a refetch.

    Args:
        after: The id the client saw last.
        until: The last id the asking hub delivered; later entries reach the client live.
        newest: The newest id the stream issued.
        oldest: The id of the oldest entry it holds; None when it holds none.
        holds_after: Whether it still holds the entry ``after``.
        following: The entries after ``after``, oldest first: all of them, or at least
            ``history_size + 1``.
        history_size: Most messages a resuming client may have missed.
    """
    after_key = parse_message_id(after)
    if after_key > parse_message_id(newest):
        return StoredEntries(False, "unknown message id", [])
    if not holds_after and after_key != parse_message_id(newest):
        if oldest is None or after_key < parse_message_id(oldest):
            return StoredEntries(False, f"history does not reach back to {after}", [])
        return StoredEntries(False, "unknown message id", [])
    if len(following) > history_size:
        return StoredEntries(False, f"history does not reach back to {after}", [])
    until_key = parse_message_id(until)
    return StoredEntries(
        True,
        None,
        [entry for entry in following if parse_message_id(entry.message_id) <= until_key],
    )


class MemoryStream:
    """The stream that :class:`MemoryBackplane` instances of one process share.

    Entries are numbered as they are added; each reading backplane keeps the number it has
    read up to, so delivering is a slice of a deque, and a reader that fell further behind
    than the stream keeps counts what it missed.

    Args:
        history_size: Most recent messages a resuming client may have missed; 0 disables
            resuming. The stream keeps at least :data:`MIN_STREAM_LENGTH`.
        history_ttl: Seconds a message is kept for resuming clients; 0 disables resuming.
        idempotency_window: Seconds an idempotency key is remembered.
        retention: What is retained for snapshots; the hub's defaults when None.
        clock: Seconds; injectable for tests.
    """

    def __init__(
        self,
        *,
        history_size: int = 1000,
        history_ttl: float = 300.0,
        idempotency_window: float = 300.0,
        retention: Retention | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.history_enabled = history_size > 0 and history_ttl > 0
        self.max_length = max(history_size, MIN_STREAM_LENGTH)
        self._clock = clock
        self._ids = MessageClock()
        self._keys = IdempotencyKeys(idempotency_window, clock=clock)
        self._entries: collections.deque[tuple[Entry, float]] = collections.deque()
        self.added = 0  # entries ever added; the next one is number ``added``
        self._readers: set[MemoryBackplane] = set()
        self.state = State(retention if retention is not None else Retention.of())
        self._audiences: dict[str, tuple[bytes, float]] = {}  # by hub: report, until when

    @property
    def first_number(self) -> int:
        """The number of the oldest entry held."""
        return self.added - len(self._entries)

    @property
    def newest_id(self) -> str:
        """The id of the newest entry ever added (``"0-0"`` before any)."""
        return self._ids.last_id

    def add(
        self,
        message_type: str,
        data: bytes | None,
        topics: Sequence[str] | None,
        origin: str | None = None,
        idempotency_key: str | None = None,
        key: str | None = None,
    ) -> Added:
        """Append a message and wake the readers, unless ``idempotency_key`` was added
        within the window (then nothing changes)."""
        if idempotency_key is not None:
            first = self._keys.get(idempotency_key)
            if first is not None:
                return Added(first, duplicate=True)
        message_id, _ = self._ids.next()
        if idempotency_key is not None:
            self._keys.put(idempotency_key, message_id)
        entry = Entry(
            message_id,
            message_type,
            data,
            tuple(topics) if topics is not None else None,
            origin,
            key,
        )
        self._entries.append((entry, self._clock()))
        self.state.record(message_id, entry.topics, key, entry)
        self.added += 1
        if len(self._entries) > self.max_length:
            self._entries.popleft()
        for reader in self._readers:
            reader._wake()
        return Added(message_id)

    def share_audience(self, node: str, report: bytes, ttl: float) -> None:
        """Keep hub ``node``'s audience report for ``ttl`` seconds."""
        self._audiences[node] = (report, self._clock() + ttl)

    def audiences(self) -> dict[str, bytes]:
        """The audience reports still current, by hub."""
        now = self._clock()
        for node in [node for node, (_, until) in self._audiences.items() if until <= now]:
            del self._audiences[node]
        return {node: report for node, (report, _) in self._audiences.items()}

    def entry(self, number: int) -> Entry:
        """The entry numbered ``number``, which must be held."""
        return self._entries[number - self.first_number][0]

    def since(self, after: str, until: str) -> StoredEntries:
        """The held entries after ``after`` up to ``until`` (see :func:`stored_since`)."""
        if not self.history_enabled:
            return StoredEntries(False, "history is disabled", [])
        entries = self._entries
        deadline = self._clock() - self.history_ttl
        while entries and entries[0][1] <= deadline:
            entries.popleft()
        after_key = parse_message_id(after)
        following: list[Entry] = []
        holds_after = False
        # Newest first, down to the client's id: the cost follows what is replayed.
        for entry, _ in reversed(entries):
            key = parse_message_id(entry.message_id)
            if key <= after_key:
                holds_after = key == after_key
                break
            following.append(entry)
        following.reverse()
        return stored_since(
            after,
            until,
            newest=self.newest_id,
            oldest=entries[0][0].message_id if entries else None,
            holds_after=holds_after,
            following=following,
            history_size=self.history_size,
        )


class MemoryBackplane:
    """Hubs of one process joined without Redis, each through its own MemoryBackplane on one
    shared :class:`MemoryStream`; all of them on one event loop.

    It behaves as :class:`~wshub.redis_backplane.RedisBackplane` does, minus the network:
    a publish is queued for the stream, every joined hub (the publisher included) reads it
    back in a later loop callback and fans it out, and resumes read the stream. It is always
    ready. Use it to serve one set of events on several hubs of one process (another port,
    another path), and as the reference the Redis backplane is tested against.

    Args:
        stream: The stream to join; None makes one of its own.
    """

    def __init__(self, stream: MemoryStream | None = None) -> None:
        self.stream = stream if stream is not None else MemoryStream()
        self._deliver: Deliver | None = None
        self._missed_callback: Missed | None = None
        self._read = 0  # the number of the next entry to deliver
        self._scheduled = False
        self._closed = False
        self._missed = 0
        self._position = "0-0"

    @property
    def ready(self) -> bool:
        """True between :meth:`start` and :meth:`close`."""
        return self._deliver is not None and not self._closed

    @property
    def position(self) -> str:
        """The last entry delivered, or the stream's newest when reading began."""
        return self._position

    @property
    def last_error(self) -> str | None:
        """Always None: a stream in this process is never unreachable."""
        return None

    def stats(self) -> dict[str, Any]:
        """The counters :meth:`RedisBackplane.stats` has; only ``missed`` can move here."""
        return {
            "ready": self.ready,
            "disconnects": 0,
            "reconnects": 0,
            "reconnect_attempts": 0,
            "publish_failures": 0,
            "missed": self._missed,
        }

    async def start(self, deliver: Deliver, missed: Missed | None = None) -> None:
        """Deliver every entry added from now on; tell ``missed`` of those it fell behind."""
        self._deliver = deliver
        self._missed_callback = missed
        self._read = self.stream.added
        self._position = self.stream.newest_id
        self.stream._readers.add(self)

    async def close(self) -> None:
        """Stop delivering."""
        self._closed = True
        self.stream._readers.discard(self)

    def publish(
        self,
        message_type: str,
        data: bytes | None,
        topics: Sequence[str] | None,
        origin: str | None = None,
        idempotency_key: str | None = None,
        key: str | None = None,
    ) -> asyncio.Future[Added]:
        """Add a message to the stream; the future is done already."""
        if not self.ready:
            raise BackplaneUnavailable("the backplane is not running")
        future: asyncio.Future[Added] = asyncio.get_running_loop().create_future()
        added = self.stream.add(message_type, data, topics, origin, idempotency_key, key)
        future.set_result(added)
        return future

    async def entries(self, after: str, until: str) -> StoredEntries:
        """The held entries after ``after`` up to ``until``."""
        return self.stream.since(after, until)

    async def retained(self) -> list[Entry]:
        """What the stream retains for snapshots, oldest first."""
        entries: list[Entry] = [retained.item for retained in self.stream.state.retained()]
        return entries

    async def share_audience(self, node: str, report: bytes, ttl: float) -> None:
        """Keep a hub's audience report on the stream for ``ttl`` seconds."""
        self.stream.share_audience(node, report, ttl)

    async def audiences(self) -> dict[str, bytes]:
        """The hubs' audience reports still current."""
        return self.stream.audiences()

    def _wake(self) -> None:
        # Delivered in a callback of its own, as entries read from Redis would be: a
        # publish never fans out inside its caller.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        stream = self.stream
        deliver = self._deliver
        if deliver is None or self._closed:
            return
        if self._read < stream.first_number:
            missed = stream.first_number - self._read
            self._missed += missed
            self._read = stream.first_number
            if self._missed_callback is not None:
                self._missed_callback(missed, self._position)
        while self._read < stream.added:
            entry = stream.entry(self._read)
            self._read += 1
            self._position = entry.message_id
            deliver(entry)
