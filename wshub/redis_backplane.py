"""Hubs joined through one Redis stream (Redis 7 or newer): the backplane of deployments.

- A publish on any hub is appended to one stream (``XADD``, pipelined, in call order); the
  entry id is the message id.
- Each hub reads the stream (``XREAD``) and fans every entry out to its own clients.
- A resume that a hub cannot serve from its own history reads the stream (``XRANGE``).

When Redis is unreachable the hubs keep serving their clients, report
:attr:`RedisBackplane.ready` False, refuse publishes with
:class:`~wshub.backplane.BackplaneUnavailable` and reconnect with a growing delay; once back,
each hub goes on reading where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson

from .backplane import (
    MIN_STREAM_LENGTH,
    BackplaneUnavailable,
    Deliver,
    Entry,
    StoredEntries,
    stored_since,
)
from .wire import parse_message_id

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["BATCH_SIZE", "READ_BLOCK_MS", "RECONNECT_DELAY", "RedisBackplane", "redact_url"]

#: Most entries one ``XREAD`` or one pipelined batch of ``XADD`` carries.
BATCH_SIZE: Final = 512
#: How long one ``XREAD`` blocks waiting for entries, in milliseconds; bounds how long a hub
#: takes to notice a Redis that vanished without closing the connection.
READ_BLOCK_MS: Final = 1000
#: First and longest wait between reconnection attempts, in seconds.
RECONNECT_DELAY: Final = (0.05, 5.0)
#: Seconds a connection must stay healthy before the reconnection delay starts over: a
#: Redis that answers one command and fails the next does not reset the backoff.
HEALTHY_AFTER: Final = 10.0


@dataclasses.dataclass(slots=True)
class _Outgoing:
    fields: dict[bytes, bytes]
    future: asyncio.Future[str]


def redact_url(url: str) -> str:
    """``url`` with its user information hidden, for logs, error messages and reports.

    Everything before the ``@`` of the authority becomes ``***``: the password, and the user
    name too, since some services take a token there. Scheme, host, port, path and query stay.

    Args:
        url: A URL such as ``redis://:secret@redis.example:6379/0``.

    Returns:
        The URL without its user information (``redis://***@redis.example:6379/0``), or
        ``url`` itself when it has none.
    """
    parts = urllib.parse.urlsplit(url)
    _, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


def _decode_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    topics = fields.get(b"topics")
    origin = fields.get(b"origin")
    return Entry(
        entry_id.decode(),
        fields[b"type"].decode(),
        fields.get(b"data"),
        tuple(orjson.loads(topics)) if topics is not None else None,
        origin.decode() if origin is not None else None,
    )


def _id_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBackplane:
    """Hubs joined through one Redis stream (Redis 7 or newer).

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        stream: The stream key the joined hubs share.
        history_size: Most recent messages a resuming client may have missed; 0 disables
            resuming. The stream itself keeps at least :data:`MIN_STREAM_LENGTH`.
        history_ttl: Seconds a message is kept for resuming clients; 0 disables resuming.
        logger: Where connection trouble is logged.

    Raises:
        ImportError: redis-py is not installed (``pip install "wshub[redis]"``).
    """

    def __init__(
        self,
        url: str,
        *,
        stream: str = "wshub:messages",
        history_size: int = 1000,
        history_ttl: float = 300.0,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        try:
            import redis.asyncio  # noqa: F401  (fail here, at construction, not at start)
        except ImportError as exc:  # pragma: no cover - redis is in the test extra
            raise ImportError('redis_url needs redis-py: pip install "wshub[redis]"') from exc
        self.url = url
        self.stream = stream
        self.history_enabled = history_size > 0 and history_ttl > 0
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.max_length = max(history_size, MIN_STREAM_LENGTH)
        self.logger = logger if logger is not None else logging.getLogger("wshub.backplane")
        self._redis: Redis | None = None
        self._ready = False
        self._deliver: Deliver | None = None
        self._last_id: str | None = None
        self._outgoing: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._last_error: str | None = None
        self._disconnects = 0
        self._reconnects = 0
        self._publish_failures = 0
        self._missed = 0
        # The stream's entries-added as of this hub's position (see _check_gap).
        self._read_count = 0
        self._delay = RECONNECT_DELAY[0]
        self._up_since = 0.0  # loop time of the last round trip after an outage
        self._attempted = asyncio.Event()

    @property
    def ready(self) -> bool:
        """True while Redis answers: publishes are taken and entries read."""
        return self._ready and not self._closed

    @property
    def position(self) -> str:
        """The last entry delivered, or the stream's end when reading began."""
        return self._last_id if self._last_id is not None else "0-0"

    @property
    def last_error(self) -> str | None:
        """Why Redis was last found unreachable, for ``/readyz`` and logs."""
        return self._last_error

    def stats(self) -> dict[str, Any]:
        """``ready``, and since start: ``disconnects``, ``reconnects``, ``publish_failures``
        and ``missed`` (messages that left the stream before this hub read them)."""
        return {
            "ready": self.ready,
            "disconnects": self._disconnects,
            "reconnects": self._reconnects,
            "publish_failures": self._publish_failures,
            "missed": self._missed,
        }

    async def start(self, deliver: Deliver) -> None:
        """Deliver every entry added from now on; returns once Redis answered or failed to."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._deliver = deliver
        # No retries inside redis-py: a publish must fail at once and visibly, and the
        # reader has its own reconnection loop with backoff.
        self._redis = Redis.from_url(
            self.url,
            socket_connect_timeout=2.0,
            socket_timeout=READ_BLOCK_MS / 1000 + 5.0,
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._write())]
        await self._attempted.wait()

    async def close(self) -> None:
        """Stop reading and writing, fail waiting publishes, close the connections."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A cancellation can be lost inside redis-py's reads on Python 3.11 (its timeout
            # and ours at once), so the loops also stop on _closed; they see it within one
            # XREAD block. A task that still has not ended is left behind, not waited for.
            _, stuck = await asyncio.wait(self._tasks, timeout=READ_BLOCK_MS / 1000 + 2.0)
            if stuck:
                self.logger.warning("the Redis reader did not stop in time; left behind")
        self._tasks = []
        self._fail_outgoing("the hub is stopping")
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    # Publishing

    def publish(
        self,
        message_type: str,
        data: bytes | None,
        topics: Sequence[str] | None,
        origin: str | None = None,
    ) -> asyncio.Future[str]:
        """Queue a message for ``XADD`` (see :meth:`Backplane.publish`)."""
        if not self.ready:
            self._publish_failures += 1
            raise BackplaneUnavailable(self._unavailable())
        fields: dict[bytes, bytes] = {b"type": message_type.encode()}
        if data is not None:
            fields[b"data"] = data
        if topics is not None:
            fields[b"topics"] = orjson.dumps(list(topics))
        if origin is not None:
            fields[b"origin"] = origin.encode()
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._outgoing.put_nowait(_Outgoing(fields, future))
        return future

    async def _write(self) -> None:
        """Send queued publishes in order, as pipelined batches on one connection."""
        outgoing = self._outgoing
        while not self._closed:
            batch = [await outgoing.get()]
            while len(batch) < BATCH_SIZE and not outgoing.empty():
                batch.append(outgoing.get_nowait())
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                continue
            try:
                ids = await self._add(batch)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BackplaneUnavailable("the hub is stopping"))
                raise
            except Exception as exc:  # redis-py's errors, OSError and timeouts alike
                self._lost(exc)
                self._publish_failures += len(batch)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BackplaneUnavailable(self._unavailable()))
                continue
            for item, entry_id in zip(batch, ids, strict=True):
                if not item.future.done():
                    item.future.set_result(_id_text(entry_id))

    async def _add(self, batch: list[_Outgoing]) -> list[Any]:
        redis = self._redis
        assert redis is not None
        pipe = redis.pipeline(transaction=False)
        for item in batch:
            pipe.xadd(self.stream, item.fields, maxlen=self.max_length, approximate=True)  # type: ignore[arg-type]
        ids: list[Any] = await pipe.execute()
        return ids

    def _fail_outgoing(self, why: str) -> None:
        while not self._outgoing.empty():
            item = self._outgoing.get_nowait()
            if not item.future.done():
                item.future.set_exception(BackplaneUnavailable(why))

    def _unavailable(self) -> str:
        if self._closed:
            return "the hub is stopping"
        reason = f": {self._last_error}" if self._last_error else ""
        return f"Redis at {redact_url(self.url)} is unreachable{reason}"

    # Reading

    async def _read(self) -> None:
        """Read the stream until closed: deliver entries, and reconnect with backoff on
        errors."""
        while not self._closed:
            try:
                await self._read_until_error()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(exc)
                # Every pooled connection went down with Redis: drop them all, or the
                # writer's first batch after Redis returns would fail on a dead socket.
                if self._redis is not None:
                    with contextlib.suppress(Exception):
                        await self._redis.connection_pool.disconnect()
            # Jitter spreads the reconnections of many hubs after a Redis restart.
            await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))
            self._delay = min(self._delay * 2, RECONNECT_DELAY[1])

    async def _read_until_error(self) -> None:
        redis = self._redis
        assert redis is not None and self._deliver is not None
        if self._last_id is None:
            # Start at the end: a new hub delivers what is published from now on.
            self._last_id, self._read_count = await self._stream_end(redis)
        else:
            # A round trip before this hub calls Redis reachable: a retry that only got as
            # far as here must not count (and log) a recovery and then a new outage.
            await redis.ping()
        self._found()
        loop = asyncio.get_running_loop()
        deliver = self._deliver
        streams: dict[Any, Any] = {self.stream: self._last_id}
        while not self._closed:
            # XINFO in the same round trip, just before XREAD: an entry after this hub's
            # position that had already left the stream is one its clients never get.
            pipe = redis.pipeline(transaction=False)
            pipe.xinfo_stream(self.stream)
            pipe.xread(streams, count=BATCH_SIZE, block=READ_BLOCK_MS)
            info, response = await pipe.execute(raise_on_error=False)
            if isinstance(response, Exception):
                raise response
            self._found()
            if self._delay > RECONNECT_DELAY[0] and loop.time() - self._up_since >= HEALTHY_AFTER:
                self._delay = RECONNECT_DELAY[0]
            if isinstance(info, dict):
                self._check_gap(info)
            else:  # no stream (yet, or Redis lost it): the next one counts from zero
                self._read_count = 0
            for _key, entries in response:
                for entry_id, fields in entries:
                    self._last_id = _id_text(entry_id)
                    self._read_count += 1
                    try:
                        entry = _decode_entry(entry_id, fields)
                    except (KeyError, ValueError):  # UnicodeDecodeError and JSON errors too
                        # Written by something else than a hub: skip it rather than stall
                        # every hub on it.
                        self.logger.warning(
                            "skipped stream entry %s: not a hub message", self._last_id
                        )
                        continue
                    try:
                        deliver(entry)
                    except Exception:
                        self.logger.exception("delivering message %s failed", entry.message_id)
                streams[self.stream] = self._last_id

    def _check_gap(self, info: dict[str, Any]) -> None:
        """Count the messages trimmed from the stream before this hub read them.

        ``entries-added`` counts every entry the stream ever took, and this hub counts what
        it read (``_read_count``, the stream's count as of its position). Once the stream's
        first entry is past the position, every entry left is unread, so any other entry
        added since the position was trimmed unread.
        """
        added = int(info["entries-added"])
        first = info.get("first-entry")
        if first and parse_message_id(_id_text(first[0])) <= parse_message_id(self.position):
            return  # the stream still holds this hub's position: nothing after it was trimmed
        unread = int(info["length"])
        if added < self._read_count:
            # A new stream under the same key: Redis lost its data (restarted without
            # persistence) or someone deleted the key. Count from the new stream on.
            self.logger.warning(
                "Redis stream %s was created anew; messages published before that may be lost",
                self.stream,
            )
            self._read_count = added - unread
            return
        missed = added - self._read_count - unread
        if missed <= 0:
            return
        self._read_count += missed
        self._missed += missed
        self.logger.error(
            "%d messages left Redis stream %s before this hub read them (it had read up to "
            "%s): its clients missed them. The stream keeps max(history_size, %d) messages, "
            "and this hub fell further behind",
            missed,
            self.stream,
            self.position,
            MIN_STREAM_LENGTH,
        )

    async def _stream_end(self, redis: Redis) -> tuple[str, int]:
        """The stream's newest id and how many entries it took, as a new reader's start."""
        from redis.exceptions import ResponseError

        try:
            info = await redis.xinfo_stream(self.stream)
        except ResponseError:  # no such key: nothing was ever published
            return "0-0", 0
        return _id_text(info["last-generated-id"]), int(info["entries-added"])

    def _found(self) -> None:
        self._attempted.set()
        if not self._ready:
            self._up_since = asyncio.get_running_loop().time()
            if self._disconnects:
                self._reconnects += 1
                self.logger.warning("Redis at %s is reachable again", redact_url(self.url))
            else:
                self.logger.info("joined Redis stream %s at %s", self.stream, redact_url(self.url))
            self._ready = True
            self._last_error = None

    def _lost(self, exc: BaseException) -> None:
        self._attempted.set()
        self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._ready or not self._disconnects:
            self._disconnects += 1
            self.logger.error(
                "Redis at %s is unreachable (%s); serving connected clients, publishes "
                "fail until it is back",
                redact_url(self.url),
                self._last_error,
            )
        self._ready = False

    # History

    async def entries(self, after: str, until: str) -> StoredEntries:
        """The entries in ``(after, until]`` and whether the stream still reaches ``after``."""
        from redis.exceptions import ResponseError

        if not self.history_enabled:
            return StoredEntries(False, "history is disabled", [])
        redis = self._redis
        if redis is None or not self.ready:
            raise BackplaneUnavailable(self._unavailable())
        parse_message_id(after)  # a malformed id raises ProtocolError before Redis is asked
        oldest_kept = int((time.time() - self.history_ttl) * 1000)
        try:
            # One transaction: the trim, the bounds and the range see the same stream.
            pipe = redis.pipeline(transaction=True)
            pipe.xtrim(self.stream, minid=f"{max(oldest_kept, 0)}-0", approximate=False)
            pipe.xinfo_stream(self.stream)
            pipe.xrange(self.stream, min=after, max=after)
            # One more than the history holds tells a client that missed too many.
            pipe.xrange(self.stream, min=f"({after}", max="+", count=self.history_size + 1)
            _, info, found, entries = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            self._lost(exc)
            raise BackplaneUnavailable(self._unavailable()) from exc
        if isinstance(info, ResponseError):  # no stream: nothing kept, or Redis lost it
            return StoredEntries(False, f"history does not reach back to {after}", [])
        for result in (info, found, entries):
            if isinstance(result, Exception):
                raise BackplaneUnavailable(f"Redis refused a history query: {result}")
        first = info.get("first-entry")
        return stored_since(
            after,
            until,
            newest=_id_text(info["last-generated-id"]),
            oldest=_id_text(first[0]) if first else None,
            holds_after=bool(found),
            following=[_decode_entry(entry_id, fields) for entry_id, fields in entries],
            history_size=self.history_size,
        )
