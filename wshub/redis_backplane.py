"""Hubs joined through one Redis stream (Redis 7 or newer): the backplane of deployments.

- A publish on any hub is appended to one stream (``XADD``, pipelined, in call order); the
  entry id is the message id.
- Each hub reads the stream (``XREAD``) and fans every entry out to its own clients.
- A resume that a hub cannot serve from its own history reads the stream (``XRANGE``).

When Redis is unreachable, or stops answering (a health probe on a connection of its own
notices within :data:`PROBE_INTERVAL` + :data:`COMMAND_TIMEOUT`), the hubs keep serving
their clients, report :attr:`RedisBackplane.ready` False, refuse publishes with
:class:`~wshub.backplane.BackplaneUnavailable` and reconnect with a growing delay; once a
round trip succeeds, each hub goes on reading where it stopped. A hub that could not reach
Redis when it started reads from its start time, so it skips nothing published meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import random
import time
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson

from .backplane import (
    MIN_STREAM_LENGTH,
    NOT_PUBLISHED,
    UNKNOWN,
    Added,
    BackplaneUnavailable,
    Deliver,
    Entry,
    Missed,
    StoredEntries,
    stored_since,
)
from .snapshot import Retention
from .wire import parse_message_id

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "BATCH_SIZE",
    "COMMAND_TIMEOUT",
    "PROBE_INTERVAL",
    "READ_BLOCK_MS",
    "RECONNECT_DELAY",
    "RedisBackplane",
    "redact_url",
    "state_keys",
]

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
#: Seconds between health probes (``PING`` on a connection of the probe's own).
PROBE_INTERVAL: Final = 1.0
#: Seconds a probe, a publish or a history query waits for Redis' answer. The reader waits
#: longer (its ``XREAD`` blocks), so it is the probe that notices a Redis that stopped
#: answering with its connections open (frozen, paused, partitioned) within seconds.
COMMAND_TIMEOUT: Final = 2.0

# One round trip checks the idempotency key, adds the entry and retains it for snapshots
# (wshub.snapshot's rule), so two hubs given the same key at once add it once and the state
# never disagrees with the stream.
# KEYS: the stream, the idempotency key's own key, the retained keys (a hash: key -> "<id>
# <entry as JSON>"), when each was published (a sorted set), the retained events (a stream).
# ARGV: the stream's MAXLEN, the idempotency window in milliseconds ("0": no idempotency
# key), the message's key ("": none), the key ttl in milliseconds, the most keys ("0": no
# keys retained), the most events ("0": none), the entry as JSON, then its fields and values.
_ADD: Final = """
if ARGV[2] ~= '0' then
    local first = redis.call('GET', KEYS[2])
    if first then
        return {first, 1}
    end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 8))
if ARGV[2] ~= '0' then
    redis.call('SET', KEYS[2], id, 'PX', ARGV[2])
end
if ARGV[3] ~= '' then
    if ARGV[5] ~= '0' then
        local ms = tonumber(string.match(id, '^%d+'))
        redis.call('HSET', KEYS[3], ARGV[3], id .. ' ' .. ARGV[7])
        redis.call('ZADD', KEYS[4], ms, ARGV[3])
        local gone = redis.call(
            'ZRANGEBYSCORE', KEYS[4], '-inf', ms - tonumber(ARGV[4]), 'LIMIT', 0, 64)
        local over = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[5])
        if over > 0 then
            for _, key in ipairs(redis.call('ZRANGE', KEYS[4], 0, over - 1)) do
                table.insert(gone, key)
            end
        end
        for _, key in ipairs(gone) do
            redis.call('HDEL', KEYS[3], key)
            redis.call('ZREM', KEYS[4], key)
        end
    end
elseif ARGV[6] ~= '0' then
    redis.call('XADD', KEYS[5], 'MAXLEN', ARGV[6], id, unpack(ARGV, 8))
end
return {id, 0}
"""
_ADD_SHA: Final = hashlib.sha1(_ADD.encode(), usedforsecurity=False).hexdigest()


@dataclasses.dataclass(slots=True)
class _Outgoing:
    fields: dict[bytes, bytes]
    idempotency_key: str | None
    key: str | None
    future: asyncio.Future[Added]


def state_keys(stream: str) -> tuple[str, str, str]:
    """The keys beside ``stream`` that retain the state for snapshots: the hash of each key's
    latest entry, the sorted set of when each was published, the stream of recent events."""
    return f"{stream}:state", f"{stream}:state:published", f"{stream}:events"


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
    key = fields.get(b"key")
    return Entry(
        entry_id.decode(),
        fields[b"type"].decode(),
        fields.get(b"data"),
        tuple(orjson.loads(topics)) if topics is not None else None,
        origin.decode() if origin is not None else None,
        key.decode() if key is not None else None,
    )


def _retained_entry(value: bytes) -> Entry:
    """A key's entry as the retained hash holds it: ``"<id> <JSON>"``."""
    entry_id, _, text = value.partition(b" ")
    fields = orjson.loads(text)
    data = fields.get("data")
    topics = fields.get("topics")
    return Entry(
        entry_id.decode(),
        fields["type"],
        data.encode() if data is not None else None,
        tuple(topics) if topics is not None else None,
        None,
        fields["key"],
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
        idempotency_window: Seconds Redis remembers a publish's idempotency key.
        retention: What Redis retains for snapshots, beside the stream (a hash of each
            key's latest entry, a sorted set of when each was published, a stream of recent
            events, under ``<stream>:state``, ``<stream>:state:published`` and
            ``<stream>:events``); the hub's defaults when None.
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
        idempotency_window: float = 300.0,
        retention: Retention | None = None,
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
        self.idempotency_window = idempotency_window
        self.retention = retention if retention is not None else Retention.of()
        self._state_keys = state_keys(stream)
        self._audience_key = f"{stream}:audience"  # the hubs that share theirs (a set)
        self._node: str | None = None  # this hub, once it shared its audience
        self._shared: tuple[bytes, int] | None = None  # its latest report and ttl (ms)
        self.logger = logger if logger is not None else logging.getLogger("wshub.backplane")
        self._redis: Redis | None = None  # the reader's
        self._commands: Redis | None = None  # publishes, history queries and the probe
        # Whether Redis holds _ADD in its script cache: loaded whenever the reader connects,
        # so that a publish is one EVALSHA, sent as it is even to a Redis that stopped
        # answering (a frozen Redis runs it when it resumes). Only a restarted Redis forgets
        # it: a NOSCRIPT answer (nothing was run) has the next batch load it first.
        self._script_loaded = False
        self._ready = False
        # Ready is both: the reader's last round trip worked, and so did the last probe.
        self._reading = False
        self._probing = True
        self._deliver: Deliver | None = None
        self._missed_callback: Missed | None = None
        self._started_ms = 0  # wall clock of start(), the position of a hub that starts blind
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
        self._checked = "0-0"  # the position at the last _check_gap
        self._delay = RECONNECT_DELAY[0]
        self._attempts = 0  # reconnection attempts since start
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
        """``ready``, and since start: ``disconnects``, ``reconnects``, ``reconnect_attempts``
        (with the backoff, a few per outage), ``publish_failures`` and ``missed`` (messages
        that left the stream before this hub read them)."""
        return {
            "ready": self.ready,
            "disconnects": self._disconnects,
            "reconnects": self._reconnects,
            "reconnect_attempts": self._attempts,
            "publish_failures": self._publish_failures,
            "missed": self._missed,
        }

    async def start(self, deliver: Deliver, missed: Missed | None = None) -> None:
        """Deliver every entry added from now on; returns once Redis answered or failed to."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._deliver = deliver
        self._missed_callback = missed
        self._started_ms = int(time.time() * 1000)

        def client(timeout: float) -> Redis:
            # No retries inside redis-py: a publish must fail at once and visibly, and the
            # reader has its own reconnection loop with backoff.
            return Redis.from_url(
                self.url,
                socket_connect_timeout=COMMAND_TIMEOUT,
                socket_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
            )

        self._redis = client(READ_BLOCK_MS / 1000 + 5.0)
        self._commands = client(COMMAND_TIMEOUT)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read()),
            loop.create_task(self._write()),
            loop.create_task(self._probe()),
        ]
        await self._attempted.wait()

    async def close(self) -> None:
        """Stop reading and writing, fail waiting publishes, close the connections."""
        await self._withdraw_audience()
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
        for redis in (self._redis, self._commands):
            if redis is not None:
                await redis.aclose()
        self._redis = self._commands = None

    # Publishing

    def publish(
        self,
        message_type: str,
        data: bytes | None,
        topics: Sequence[str] | None,
        origin: str | None = None,
        idempotency_key: str | None = None,
        key: str | None = None,
    ) -> asyncio.Future[Added]:
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
        if key is not None:
            fields[b"key"] = key.encode()
        future: asyncio.Future[Added] = asyncio.get_running_loop().create_future()
        self._outgoing.put_nowait(_Outgoing(fields, idempotency_key, key, future))
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
                self._fail(batch, "the hub is stopped while the message was on its way")
                raise
            except Exception as exc:  # redis-py's errors, OSError and timeouts alike
                self._lost(exc)
                self._publish_failures += len(batch)
                # The commands may have reached Redis before the connection failed or the
                # answer timed out: a frozen Redis executes them when it resumes.
                self._fail(batch, self._unavailable())
                continue
            for item, added in zip(batch, ids, strict=True):
                if not item.future.done():
                    item.future.set_result(added)

    def _fail(self, batch: list[_Outgoing], why: str) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(
                    BackplaneUnavailable(f"outcome unknown, {why}", outcome=UNKNOWN)
                )

    async def _add(self, batch: list[_Outgoing]) -> list[Added]:
        from redis.exceptions import NoScriptError

        redis = self._commands
        assert redis is not None
        if not self._script_loaded:
            await redis.script_load(_ADD)
            self._script_loaded = True
        pipe = redis.pipeline(transaction=False)
        window_ms = max(int(self.idempotency_window * 1000), 1)
        retention = self.retention
        max_keys = retention.max_keys if retention.keeps_keys else 0
        events = retention.window if retention.keeps_events else 0
        key_ttl_ms = int(retention.key_ttl * 1000)
        for item in batch:
            retained = max_keys if item.key is not None else events
            if item.idempotency_key is None and not retained:
                pipe.xadd(self.stream, item.fields, maxlen=self.max_length, approximate=True)  # type: ignore[arg-type]
                continue
            pipe.evalsha(
                _ADD_SHA,
                5,
                self.stream,
                f"{self.stream}:idempotency:{item.idempotency_key or ''}",
                *self._state_keys,
                self.max_length,
                window_ms if item.idempotency_key is not None else 0,
                item.key or "",
                key_ttl_ms,
                max_keys,
                events,
                _state_value(item) if item.key is not None and max_keys else b"",
                *(part for pair in item.fields.items() for part in pair),
            )
        try:
            results: list[Any] = await pipe.execute()
        except NoScriptError:
            self._script_loaded = False
            raise
        return [
            Added(_id_text(result[0]), bool(result[1]))
            if isinstance(result, list)
            else Added(_id_text(result))
            for result in results
        ]

    def _fail_outgoing(self, why: str) -> None:
        while not self._outgoing.empty():
            item = self._outgoing.get_nowait()
            if not item.future.done():
                item.future.set_exception(BackplaneUnavailable(why, outcome=NOT_PUBLISHED))

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
                for redis in (self._redis, self._commands):
                    if redis is not None:
                        with contextlib.suppress(Exception):
                            await redis.connection_pool.disconnect()
            # Jitter spreads the reconnections of many hubs after a Redis restart.
            await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))
            self._delay = min(self._delay * 2, RECONNECT_DELAY[1])
            self._attempts += 1

    async def _read_until_error(self) -> None:
        redis = self._redis
        assert redis is not None and self._deliver is not None
        if self._last_id is None:
            if self._attempts == 0:
                # Start at the end: a new hub delivers what is published from now on.
                self._last_id, self._read_count = await self._stream_end(redis)
            else:
                # Redis was out of reach when this hub started: read from its start time,
                # or what other hubs published since Redis returned would never reach this
                # hub's clients.
                self._last_id, self._read_count = await self._stream_at(
                    redis, f"{self._started_ms}-0"
                )
            self._checked = self._last_id
        else:
            # A round trip before this hub calls Redis reachable: a retry that only got as
            # far as here must not count (and log) a recovery and then a new outage.
            await redis.ping()
        await redis.script_load(_ADD)
        self._script_loaded = True
        self._reader_found()
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
            self._reader_found()
            if (
                self._delay > RECONNECT_DELAY[0]
                and self._ready
                and loop.time() - self._up_since >= HEALTHY_AFTER
            ):
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
        it read (``_read_count``, the stream's count as of its position). Caught up (its
        position is the newest id), every entry added is one it read or one it missed. Behind
        it, while the stream still holds the position, everything after it is still there to
        read (a stream is trimmed from its oldest end) and the count waits until it caught
        up; once the first entry is past the position, every entry left is unread, so any
        other entry added since the position was trimmed unread.
        """
        added = int(info["entries-added"])
        if added < self._read_count:
            # A new stream under the same key: Redis lost its data (restarted without
            # persistence) or someone deleted the key. Count from the new stream on.
            self.logger.warning(
                "Redis stream %s was created anew; messages published before that may be lost",
                self.stream,
            )
            self._read_count = added - int(info["length"])
            return
        position = parse_message_id(self.position)
        first = info.get("first-entry")
        # Where the missed ones were: after the position of the last check when caught up
        # (they were trimmed while this hub's XREAD waited), else right after this one.
        after, self._checked = self._checked, self.position
        if parse_message_id(_id_text(info["last-generated-id"])) == position:
            missed = added - self._read_count
        elif first and parse_message_id(_id_text(first[0])) <= position:
            return
        else:
            missed = added - self._read_count - int(info["length"])
            after = self.position
        if missed <= 0:
            return
        self._read_count += missed
        self._report_missed(missed, after)

    def _report_missed(self, missed: int | None, after: str) -> None:
        """Log, count and tell the hub of messages its clients will never get."""
        if missed is not None:
            self._missed += missed
        self.logger.error(
            "%s messages after %s left Redis stream %s before this hub read them: its "
            "clients missed them. The stream keeps max(history_size, %d) messages, and this "
            "hub fell further behind",
            missed if missed is not None else "an unknown number of",
            after,
            self.stream,
            MIN_STREAM_LENGTH,
        )
        if self._missed_callback is not None:
            self._missed_callback(missed, after)

    async def _stream_end(self, redis: Redis) -> tuple[str, int]:
        """The stream's newest id and how many entries it took, as a new reader's start."""
        from redis.exceptions import ResponseError

        try:
            info = await redis.xinfo_stream(self.stream)
        except ResponseError:  # no such key: nothing was ever published
            return "0-0", 0
        return _id_text(info["last-generated-id"]), int(info["entries-added"])

    async def _stream_at(self, redis: Redis, position: str) -> tuple[str, int]:
        """``position`` and the stream's count of entries up to it, as a reader's start.

        The count is what the stream took minus what it holds after ``position``: once,
        when a hub that started blind first reaches Redis, so the whole stream is read.
        """
        from redis.exceptions import ResponseError

        try:
            info = await redis.xinfo_stream(self.stream)
        except ResponseError:  # no such key: nothing was published since
            return position, 0
        length = int(info["length"])
        following = (
            await redis.xrange(self.stream, min=f"({position}", max="+", count=length)
            if length
            else None
        ) or []
        deleted = info.get("max-deleted-entry-id")
        if deleted is not None and parse_message_id(_id_text(deleted)) > parse_message_id(
            position
        ):
            # Trimmed past the start already: some published after it are gone, and the
            # stream does not say how many.
            self._report_missed(None, position)
        return position, int(info["entries-added"]) - len(following)

    async def _probe(self) -> None:
        """PING Redis every :data:`PROBE_INTERVAL` on a connection of the probe's own.

        The reader's ``XREAD`` waits longer than :data:`COMMAND_TIMEOUT`, and a Redis that
        is frozen rather than gone keeps its connections open: this is what notices it.
        """
        redis = self._commands
        assert redis is not None
        while not self._closed:
            try:
                shared, self._shared = self._shared, None
                if shared is None or self._node is None:
                    await redis.ping()
                else:
                    report, ttl_ms = shared
                    pipe = redis.pipeline(transaction=False)
                    pipe.ping()
                    pipe.set(f"{self._audience_key}:{self._node}", report, px=ttl_ms)
                    pipe.sadd(self._audience_key, self._node)
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._lost(exc, probe=True)
            else:
                self._probing = True
                self._update()
            await asyncio.sleep(PROBE_INTERVAL)

    def _reader_found(self) -> None:
        self._attempted.set()
        self._reading = True
        self._update()

    def _update(self) -> None:
        """Become ready once the reader and the probe both had a round trip: counted and
        logged once per recovery."""
        if self._ready or not (self._reading and self._probing):
            return
        self._up_since = asyncio.get_running_loop().time()
        if self._disconnects:
            self._reconnects += 1
            self.logger.warning("Redis at %s is reachable again", redact_url(self.url))
        else:
            self.logger.info("joined Redis stream %s at %s", self.stream, redact_url(self.url))
        self._ready = True
        self._last_error = None

    def _lost(self, exc: BaseException, *, probe: bool = False) -> None:
        """A round trip failed: not ready until both the reader and the probe have one
        again; counted and logged once per outage."""
        self._attempted.set()
        self._last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if probe:
            self._probing = False
        else:
            self._reading = False
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
        redis = self._commands
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

    async def share_audience(self, node: str, report: bytes, ttl: float) -> None:
        """Keep this hub's audience in Redis for ``ttl`` seconds (Redis's clock, so hosts'
        clocks need not agree), under a key of its own listed in a set.

        Sent with the probe's next ``PING``, in its round trip: no connection of its own,
        and a failure is the probe's to judge.
        """
        self._node = node
        self._shared = (report, max(1, int(ttl * 1000)))

    async def audiences(self) -> dict[str, bytes]:
        """Every hub's audience still in Redis; hubs whose report expired leave the set."""
        redis = self._commands
        if redis is None or not self.ready:
            raise BackplaneUnavailable(self._unavailable())
        try:
            nodes = sorted(_id_text(node) for node in await redis.smembers(self._audience_key))
            if not nodes:
                return {}
            reports = await redis.mget([f"{self._audience_key}:{node}" for node in nodes])
            gone = [node for node, report in zip(nodes, reports, strict=True) if report is None]
            if gone:
                await redis.srem(self._audience_key, *gone)
        except Exception as exc:
            self._lost(exc)
            raise BackplaneUnavailable(self._unavailable()) from exc
        return {
            node: report if isinstance(report, bytes) else str(report).encode()
            for node, report in zip(nodes, reports, strict=True)
            if report is not None
        }

    async def _withdraw_audience(self) -> None:
        """A hub that stops takes its audience out at once rather than when it expires."""
        redis = self._commands
        if self._node is None or redis is None or not self.ready:
            return
        with contextlib.suppress(Exception):
            pipe = redis.pipeline(transaction=False)
            pipe.delete(f"{self._audience_key}:{self._node}")
            pipe.srem(self._audience_key, self._node)
            await pipe.execute()

    async def retained(self) -> list[Entry]:
        """What Redis retains for snapshots: each key's latest entry and the recent events."""
        redis = self._commands
        if redis is None or not self.ready:
            raise BackplaneUnavailable(self._unavailable())
        state, _, events = self._state_keys
        try:
            pipe = redis.pipeline(transaction=True)
            pipe.hgetall(state)
            pipe.xrevrange(events, count=max(self.retention.window, 1))
            keyed, recent = await pipe.execute()
        except Exception as exc:
            self._lost(exc)
            raise BackplaneUnavailable(self._unavailable()) from exc
        entries: list[Entry] = []
        for value in keyed.values():
            try:
                entries.append(_retained_entry(value))
            except (KeyError, ValueError, AttributeError):  # not written by a hub
                continue
        for entry_id, fields in recent:
            try:
                entries.append(_decode_entry(entry_id, fields))
            except (KeyError, ValueError):
                continue
        entries.sort(key=lambda entry: parse_message_id(entry.message_id))
        return entries


def _state_value(item: _Outgoing) -> bytes:
    """A keyed entry as the retained hash holds it, after its id (Redis adds that)."""
    fields = item.fields
    data = fields.get(b"data")
    topics = fields.get(b"topics")
    return orjson.dumps(
        {
            "type": fields[b"type"].decode(),
            "data": data.decode() if data is not None else None,
            "topics": orjson.Fragment(topics) if topics is not None else None,
            "key": item.key,
        }
    )
