"""Resuming: what a client that comes back with ``since`` missed, from memory or a backplane.

A resume is answered in one synchronous step when this hub's own history
(:class:`~wshub.history.MemoryHistory`) holds the range: the answer and the replay are queued
before any later publish can reach the client, so there is neither gap nor duplicate. When it
does not and a backplane keeps a longer history, the resume becomes a :class:`PendingReplay`:
the entries are read from the backplane while the messages the client should get live are
held back, and :mod:`wshub.clients` sends the answer, the replay and what was held once the
read is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .backplane import Backplane, BackplaneUnavailable, StoredEntries
from .fanout import Framer
from .history import History, Replay, missed
from .wire import ProtocolError, parse_message_id

__all__ = ["PendingReplay", "Resumer", "answer_recovery"]

_Key = tuple[int, int]


@dataclasses.dataclass(slots=True)
class PendingReplay:
    """A resume this hub cannot serve from its own history: read from the backplane.

    Until the stored messages arrive, messages the client should get live are held here so
    they follow the replay instead of overtaking it.
    """

    since: str
    until: str  # the last id this hub had delivered when the resume began
    topics: frozenset[str]  # every topic the client will hold
    live_topics: frozenset[str] | None  # topics it receives live meanwhile (None: nothing)
    new_topics: tuple[str, ...]  # subscribed in the core when the replay is sent
    delivered_after: str | None
    answer: dict[str, Any]
    greeting: bool  # True: answers the connection (?since=); False: a subscribe
    errors: list[ProtocolError]
    snapshot: bool = False  # the client asked for a snapshot should the resume fail
    held: list[tuple[_Key, Any]] = dataclasses.field(default_factory=list)
    inbox: list[str | bytes | None] = dataclasses.field(default_factory=list)
    # More was delivered meanwhile than the client may have queued: nothing more is held,
    # and the client is closed as a slow consumer instead of being sent a replay with a gap.
    overflowed: bool = False


def answer_recovery(answer: dict[str, Any], recovered: bool, reason: str | None) -> None:
    """Say in a greeting or ``subscribed`` answer whether the resume recovered everything."""
    answer["recovered"] = recovered
    if reason is not None:
        answer["reason"] = reason


class Resumer:
    """Finds what resuming clients missed, and holds live messages for pending ones.

    Args:
        history: This hub's own history.
        backplane: The backplane whose store reaches further back; None alone.
        framer: Frames entries read from the backplane.
        last_id: The newest message id this hub has queued for its clients.
        write_timeout: How long a pending resume waits for this hub to catch up.
        max_held: Most live messages held for one pending resume (``client_buffer_size``).
    """

    def __init__(
        self,
        history: History,
        backplane: Backplane | None,
        framer: Framer,
        last_id: Callable[[], str],
        write_timeout: float,
        max_held: int,
    ) -> None:
        self.max_held = max_held
        self.history = history
        self.backplane = backplane
        self.framer = framer
        self.last_id = last_id
        self.write_timeout = write_timeout
        # Pending resumes by client id: each is told of every delivered message.
        self.pending: dict[str, PendingReplay] = {}
        self._delivered = asyncio.Event()

    def local(
        self,
        since: str,
        topics: frozenset[str] | Sequence[str],
        *,
        delivered_after: str | None = None,
        delivered_topics: frozenset[str] = frozenset(),
    ) -> Replay:
        """What this hub's own history holds after ``since`` for ``topics``."""
        return self.history.since(
            since, topics, delivered_after=delivered_after, delivered_topics=delivered_topics
        )

    def needs_store(self, replay: Replay) -> bool:
        """This hub's history could not serve a resume that the backplane's store may."""
        return (
            not replay.recovered
            and self.backplane is not None
            and replay.reason != "history is disabled"
        )

    def delivered(self, key: _Key, topics: Sequence[str] | None, message: Any) -> None:
        """A message was queued for this hub's clients: hold it for pending resumes."""
        for pending in self.pending.values():
            live = pending.live_topics
            if pending.overflowed:
                continue
            if missed(key, topics, pending.topics, None, ()) and not (
                live is not None and missed(key, topics, live, None, ())
            ):
                if len(pending.held) >= self.max_held:
                    pending.overflowed = True
                    pending.held.clear()
                else:
                    pending.held.append((key, message))
        self._delivered.set()

    async def read_stored(self, pending: PendingReplay) -> StoredEntries:
        """Read a pending resume's range from the backplane; a failure is not recovered."""
        backplane = self.backplane
        assert backplane is not None
        try:
            stored = await backplane.entries(pending.since, pending.until)
            # A client back from another hub may have seen messages this one has not read
            # yet: wait for them, so they are held and skipped rather than sent twice.
            since_key = parse_message_id(pending.since)
            async with asyncio.timeout(self.write_timeout):
                while stored.recovered and parse_message_id(self.last_id()) < since_key:
                    self._delivered.clear()
                    await self._delivered.wait()
        except BackplaneUnavailable as exc:
            return StoredEntries(False, f"history unavailable: {exc}", [])
        except TimeoutError:
            return StoredEntries(False, "the backplane did not deliver the message yet", [])
        return stored

    def stored_messages(self, pending: PendingReplay, stored: StoredEntries) -> list[Any]:
        """The replay of a pending resume: the stored entries it missed, then what was held."""
        held = pending.held
        if not stored.recovered:
            return [message for _, message in held]
        delivered_after = (
            parse_message_id(pending.delivered_after)
            if pending.delivered_after is not None
            else None
        )
        live = pending.live_topics or ()
        messages = [
            self.framer.stored(entry.message_type, entry.data, entry.message_id, entry.key)
            for entry in stored.entries
            if missed(
                parse_message_id(entry.message_id),
                entry.topics,
                pending.topics,
                delivered_after,
                live,
            )
        ]
        since_key = parse_message_id(pending.since)
        messages.extend(message for key, message in held if key > since_key)
        return messages
