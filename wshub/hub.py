"""The hub: lifecycle, clients, subscriptions, publishing and the runner's notifications.

Publishing is synchronous and never awaits: it serializes and frames the message once and
hands the frame to the fan-out core, which queues it for every recipient and writes each
client's queue in one transport write at the end of the event-loop iteration.

Hubs joined by a :class:`~wshub.redis_backplane.RedisBackplane` send each publish to Redis instead,
and frame and fan out every message when it comes back from the shared stream, in the one
order all of them see.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

import orjson
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from . import events
from ._fanout_py import JSON_OPTIONS
from .backplane import Backplane, BackplaneUnavailable, Entry, StoredEntries
from .config import HubConfig
from .events import HistoricRun, Regression
from .fanout import Implementation, core_module
from .history import History, MemoryHistory, Replay, missed
from .protocol import (
    PROTOCOL_TYPES,
    MessageClock,
    MessageType,
    ProtocolError,
    parse_client_message,
    parse_message_id,
    parse_topics,
    rfc3339,
)
from .redis_backplane import RedisBackplane

__all__ = ["BroadcastBufferFull", "Hub", "Published"]

SLOW_CONSUMER_CLOSE_CODE = 4008
_TRY_AGAIN_LATER = 1013


class BroadcastBufferFull(RuntimeError):
    """``publish_threadsafe`` found ``broadcast_buffer_size`` messages already waiting."""


class Published(NamedTuple):
    """What :meth:`Hub.publish` did.

    Attributes:
        id: The message's id, global across hubs joined by a backplane.
        recipients: How many clients of this hub it was queued for; None when this hub had
            not read it back from the backplane within ``write_timeout``.
    """

    id: str
    recipients: int | None


@dataclasses.dataclass(slots=True)
class _PendingReplay:
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
    held: list[tuple[tuple[int, int], bytes]] = dataclasses.field(default_factory=list)
    inbox: list[str | bytes] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class _Session:
    """What the hub knows of a client beside its place in the fan-out core."""

    client: Any  # the core's Client
    connection: Any
    remote_addr: str
    user_agent: str | None
    connected_at: float
    # The last message id issued before the client joined: later messages reached it live.
    joined_after: str = "0-0"
    last_ping: float | None = None
    pending: _PendingReplay | None = None


class Hub:
    """A WebSocket fan-out hub.

    Args:
        config: Settings; :class:`HubConfig` defaults when None.
        logger: Where the hub logs; the ``"wshub"`` logger when None.
        implementation: ``"cython"`` or ``"python"`` to pick a fan-out core; None takes
            :data:`wshub.IMPLEMENTATION`.
        backplane: Joins this hub with others; None makes a
            :class:`~wshub.redis_backplane.RedisBackplane` when ``config.redis_url`` is set and
            runs the hub alone otherwise.

    Raises:
        ImportError: ``implementation="cython"`` and the extension is not built, or
            ``redis_url`` is set and redis-py is not installed.
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        implementation: Implementation | None = None,
        backplane: Backplane | None = None,
    ) -> None:
        self.config = config if config is not None else HubConfig()
        if not isinstance(self.config, HubConfig):
            raise TypeError(f"config must be a HubConfig, got {self.config!r}")
        self.logger = logger if logger is not None else logging.getLogger("wshub")
        self._core = core_module(implementation)
        self.implementation: Implementation = (
            "python" if self._core.__name__.endswith("_py") else "cython"
        )
        self._state = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fanout: Any = None
        self._clock = MessageClock()
        self._history: History = MemoryHistory(self.config.history_size, self.config.history_ttl)
        if backplane is None and self.config.redis_url is not None:
            backplane = RedisBackplane(
                self.config.redis_url,
                stream=self.config.redis_stream,
                history_size=self.config.history_size,
                history_ttl=self.config.history_ttl,
                logger=self.logger,
            )
        self._backplane = backplane
        # With a backplane: publishes awaiting their return.
        self._origin = secrets.token_hex(6)
        self._origin_sequence = 0
        self._returning: dict[str, asyncio.Future[int | None]] = {}
        self._timestamp_ms = -1
        self._timestamp = ""
        self._pending: dict[str, _Session] = {}
        self._delivered = asyncio.Event()
        self._sessions: dict[str, _Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._drain_tasks: dict[str, asyncio.Task[None]] = {}
        self._threadsafe_lock = threading.Lock()
        self._threadsafe_waiting = 0
        self._published = 0
        self._slow_consumer_disconnects = 0
        self._protocol_errors = 0
        self._rejected = 0

    # Lifecycle

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`: the hub accepts clients and messages."""
        return self._state == "running"

    @property
    def ready(self) -> bool:
        """True while the hub runs and its backplane, if any, takes publishes."""
        return self._state == "running" and (self._backplane is None or self._backplane.ready)

    @property
    def backplane(self) -> Backplane | None:
        """The backplane joining this hub with others; None when it runs alone."""
        return self._backplane

    async def start(self) -> None:
        """Start the hub on the running event loop. Starting a running hub does nothing.

        Raises:
            RuntimeError: The hub was stopped; a stopped hub cannot be restarted.
        """
        if self._state == "running":
            return
        if self._state != "new":
            raise RuntimeError("a stopped hub cannot be started again; create a new Hub")
        self._loop = asyncio.get_running_loop()
        config = self.config
        self._fanout = self._core.Fanout(
            self._loop,
            client_buffer_size=config.client_buffer_size,
            max_buffered_bytes=config.max_buffered_bytes,
            drop_oldest=config.slow_client_policy == "drop_oldest",
            flush_interval=config.flush_interval,
            on_overflow=self._on_overflow,
            on_blocked=self._on_blocked,
        )
        self._state = "running"
        if self._backplane is not None:
            await self._backplane.start(self._deliver)
        self.logger.debug("hub started with the %s fan-out core", self.implementation)

    async def stop(self) -> None:
        """Flush, say goodbye and close every client with 1001. Safe to call at any time.

        Frames already queued are written first, then every client gets a ``disconnection``
        message; waiting for slow clients and for closing handshakes is bounded by
        ``write_timeout``, after which their transports are aborted.
        """
        if self._state == "stopping":
            await self._stopped.wait()
            return
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopping"
        try:
            await self._shut_down()
        finally:
            self._state = "stopped"
            self._stopped.set()
        self.logger.debug("hub stopped")

    async def _shut_down(self) -> None:
        fanout = self._fanout
        timeout = self.config.write_timeout
        if self._backplane is not None:
            await self._backplane.close()
            for returned in self._returning.values():
                if not returned.done():  # published, but it will not come back here
                    returned.set_result(None)
        goodbye = self._frame(MessageType.DISCONNECTION, {"reason": "server shutdown"})
        fanout.publish_all(goodbye)
        fanout.flush()
        if self._drain_tasks:
            await asyncio.wait(list(self._drain_tasks.values()), timeout=timeout)
        sessions = list(self._sessions.values())
        await asyncio.gather(
            *(
                self._close(session.connection, CloseCode.GOING_AWAY, "server shutdown")
                for session in sessions
            )
        )
        for session in sessions:  # their handlers may not have run since
            self._detach(session)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        fanout.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # Clients

    @property
    def client_count(self) -> int:
        """How many clients are connected."""
        return len(self._sessions)

    async def register(self, connection: Any) -> None:
        """Serve an accepted websockets connection as a hub client until it closes.

        This is the connection handler: pass :attr:`handler` to
        ``websockets.asyncio.server.serve``, or await this from your own handler after
        routing. The client starts with the topics of the URL's ``?topics=a,b`` or
        ``default_topics``, receives a ``connection`` message and is then served.
        """
        if self._state != "running":
            await self._close(connection, CloseCode.GOING_AWAY, "server shutdown")
            return
        if len(self._sessions) >= self.config.max_clients:
            # wshub.serve refuses these with HTTP 503 before the handshake; this catches
            # handshakes that completed while the hub was filling up, and other servers.
            self._rejected += 1
            await self._close(connection, _TRY_AGAIN_LATER, "too many clients")
            return
        session = self._attach(connection)
        try:
            await self._serve(session)
        finally:
            self._detach(session)

    handler = register
    """The connection handler for ``websockets.asyncio.server.serve``."""

    def client_info(self) -> list[dict[str, Any]]:
        """A snapshot of every connected client, as JSON-ready dictionaries."""
        return [self._describe(session) for session in self._sessions.values()]

    def stats(self) -> dict[str, Any]:
        """Counters since start: clients, messages and bytes, drops and errors, and the
        backplane's (None when the hub runs alone)."""
        fanout = self._fanout
        backplane = self._backplane.stats() if self._backplane is not None else None
        return {
            "implementation": self.implementation,
            "clients": len(self._sessions),
            "messages_published": self._published,
            "deliveries": fanout.deliveries if fanout is not None else 0,
            "drops": fanout.drops if fanout is not None else 0,
            "bytes_sent": fanout.bytes_sent if fanout is not None else 0,
            "writes": fanout.writes if fanout is not None else 0,
            "slow_consumer_disconnects": self._slow_consumer_disconnects,
            "protocol_errors": self._protocol_errors,
            "rejected_connections": self._rejected,
            "publish_failures": backplane["publish_failures"] if backplane is not None else 0,
            "backplane": backplane,
        }

    # Publishing

    async def publish(
        self,
        message_type: str,
        data: Any = None,
        topics: Iterable[str] | str | None = None,
    ) -> Published:
        """Publish to every client subscribed to one of ``topics`` (or to ``"*"``), or to every
        client when ``topics`` is None, on this hub and on every hub joined with it.

        Alone, the hub queues the message at once. With a backplane, this returns once the
        backplane took the message and this hub read it back and queued it for its clients.

        Returns:
            The message's id and how many clients of this hub it was queued for.

        Raises:
            TypeError: ``data`` cannot be serialized, or a topic is not a string.
            ValueError: ``message_type`` is one the protocol uses.
            BackplaneUnavailable: The backplane could not take it (Redis is unreachable);
                the message was not published.
            RuntimeError: The hub is not running.
        """
        if self._state != "running":
            raise RuntimeError("the hub is not running")
        topic_list = _topic_list(topics) if topics is not None else None
        backplane = self._backplane
        if backplane is None:
            return Published(*self._publish_here(message_type, data, topic_list))
        payload = self._encode_published(message_type, data)
        self._origin_sequence += 1
        origin = f"{self._origin}:{self._origin_sequence}"
        returned: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._returning[origin] = returned
        try:
            message_id = await backplane.publish(message_type, payload, topic_list, origin)
            try:
                async with asyncio.timeout(self.config.write_timeout):
                    recipients: int | None = await returned
            except TimeoutError:
                recipients = None
        finally:
            self._returning.pop(origin, None)
        return Published(message_id, recipients)

    def broadcast_to_all(self, message_type: str, data: Any = None) -> int:
        """Queue a message for every connected client, whatever it subscribed to.

        With a backplane the message goes to the backplane and is queued when it comes back,
        so the count is not known yet: 0 is returned. A failure on the way is logged and
        counted (``publish_failures``); ``await`` :meth:`publish` to learn of it instead.

        Returns:
            How many clients it was queued for; 0 when the hub is not running.

        Raises:
            TypeError: ``data`` cannot be serialized, or ``message_type`` is not a string.
            ValueError: ``message_type`` is one the protocol uses (``connection``, ``error``,
                ``subscribed``, ...).
            BackplaneUnavailable: The backplane is known to be unreachable.
        """
        return self._broadcast(message_type, data, None)

    def broadcast_to_subscribers(
        self, message_type: str, data: Any, topics: Iterable[str] | str
    ) -> int:
        """Queue a message for every client subscribed to one of ``topics`` or to ``"*"``.

        A client matching several topics receives the message once. With a backplane, see
        :meth:`broadcast_to_all`.

        Returns:
            How many clients it was queued for; 0 when the hub is not running.

        Raises:
            TypeError: ``data`` cannot be serialized, or a topic is not a string.
            ValueError: ``message_type`` is one the protocol uses.
            BackplaneUnavailable: The backplane is known to be unreachable.
        """
        return self._broadcast(message_type, data, topics)

    def _broadcast(self, message_type: str, data: Any, topics: Iterable[str] | str | None) -> int:
        """The synchronous publish behind both ``broadcast_*`` (``topics`` None: to all)."""
        if self._state != "running":
            return 0
        topic_list = _topic_list(topics) if topics is not None else None
        if self._backplane is not None:
            self._send_to_backplane(message_type, data, topic_list)
            return 0
        return self._publish_here(message_type, data, topic_list)[1]

    def _publish_here(
        self, message_type: str, data: Any, topics: list[str] | None
    ) -> tuple[str, int]:
        """Publish without a backplane: id, frame, history and fan-out in one step."""
        message_id, frame = self._frame_published(message_type, data, topics)
        if topics is None:
            return message_id, int(self._fanout.publish_all(frame))
        return message_id, int(self._fanout.publish_topics(frame, topics))

    def _send_to_backplane(self, message_type: str, data: Any, topics: list[str] | None) -> None:
        assert self._backplane is not None
        payload = self._encode_published(message_type, data)
        future = self._backplane.publish(message_type, payload, topics)
        future.add_done_callback(self._sent_to_backplane)

    def _sent_to_backplane(self, future: asyncio.Future[str]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            # The caller has returned already; the backplane counted the failure.
            self.logger.error("a message was not published: %s", exc)

    def publish_threadsafe(
        self,
        message_type: str,
        data: Any = None,
        topics: Iterable[str] | str | None = None,
    ) -> concurrent.futures.Future[int]:
        """Publish from another thread: to ``topics``, or to every client when None.

        Returns:
            A future with the number of clients the message was queued for (0 when the hub
            is not running). With a backplane, the number of this hub's clients, once it
            read the message back (see :meth:`publish`), or its failure.

        Raises:
            BroadcastBufferFull: ``broadcast_buffer_size`` messages are already waiting for
                the hub's loop.
        """
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        loop = self._loop
        if self._state != "running" or loop is None:
            future.set_result(0)
            return future
        with self._threadsafe_lock:
            if self._threadsafe_waiting >= self.config.broadcast_buffer_size:
                raise BroadcastBufferFull(
                    f"{self._threadsafe_waiting} messages are waiting for the hub's loop "
                    f"(broadcast_buffer_size={self.config.broadcast_buffer_size})"
                )
            self._threadsafe_waiting += 1
        try:
            loop.call_soon_threadsafe(
                self._publish_from_thread, message_type, data, topics, future
            )
        except RuntimeError:  # the loop is closed
            with self._threadsafe_lock:
                self._threadsafe_waiting -= 1
            future.set_result(0)
        return future

    def _publish_from_thread(
        self,
        message_type: str,
        data: Any,
        topics: Iterable[str] | str | None,
        future: concurrent.futures.Future[int],
    ) -> None:
        with self._threadsafe_lock:
            self._threadsafe_waiting -= 1
        if self._backplane is not None and self._state == "running":
            self._spawn(self._publish_for_thread(message_type, data, topics, future))
            return
        try:
            if topics is None:
                count = self.broadcast_to_all(message_type, data)
            else:
                count = self.broadcast_to_subscribers(message_type, data, topics)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(count)

    async def _publish_for_thread(
        self,
        message_type: str,
        data: Any,
        topics: Iterable[str] | str | None,
        future: concurrent.futures.Future[int],
    ) -> None:
        try:
            published = await self.publish(message_type, data, topics)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(published.recipients or 0)

    # The runner's notifications

    def _notify(self, message_type: MessageType, event: events.Event) -> int:
        data, topics = event
        return self.broadcast_to_subscribers(message_type, data, topics)

    def notify_new_run(self, run: HistoricRun | Mapping[str, Any]) -> int:
        """Announce a finished, stored run (``new_run``). Returns the recipient count."""
        return self._notify(MessageType.NEW_RUN, events.new_run_event(run))

    def notify_regression(
        self, regression: Regression | Mapping[str, Any], run: HistoricRun | Mapping[str, Any]
    ) -> int:
        """Announce a regression found in ``run`` (``regression_detected``)."""
        return self._notify(
            MessageType.REGRESSION_DETECTED, events.regression_event(regression, run)
        )

    def notify_baseline_updated(self, baseline_name: str, run_id: str, test_name: str) -> int:
        """Announce that ``run_id`` is now the baseline ``baseline_name``."""
        return self._notify(
            MessageType.BASELINE_UPDATED,
            events.baseline_updated_event(baseline_name, run_id, test_name),
        )

    def notify_analysis_complete(self, run_id: str, test_name: str, analysis_results: Any) -> int:
        """Announce the results of a run's analysis (``analysis_complete``)."""
        return self._notify(
            MessageType.ANALYSIS_COMPLETE,
            events.analysis_complete_event(run_id, test_name, analysis_results),
        )

    def notify_run_started(self, run_id: str, test_name: str, **details: Any) -> int:
        """Announce a run that began (``run_started``); see :func:`events.run_started_event`."""
        return self._notify(
            MessageType.RUN_STARTED, events.run_started_event(run_id, test_name, **details)
        )

    def notify_run_progress(
        self, run_id: str, test_name: str, progress: float, **details: Any
    ) -> int:
        """Announce a running benchmark's progress, 0 to 1 (``run_progress``)."""
        return self._notify(
            MessageType.RUN_PROGRESS,
            events.run_progress_event(run_id, test_name, progress, **details),
        )

    def notify_run_complete(self, run_id: str, test_name: str, **details: Any) -> int:
        """Announce that a run finished (``run_complete``)."""
        return self._notify(
            MessageType.RUN_COMPLETE, events.run_complete_event(run_id, test_name, **details)
        )

    def notify_run_failed(self, run_id: str, test_name: str, error: str, **details: Any) -> int:
        """Announce that a run failed with ``error`` (``run_failed``)."""
        return self._notify(
            MessageType.RUN_FAILED,
            events.run_failed_event(run_id, test_name, error, **details),
        )

    # Framing

    def _frame(
        self,
        message_type: str,
        data: Any = None,
        *,
        message_id: str | None = None,
        timestamp: str | None = None,
        client_id: str | None = None,
        error: Any = None,
    ) -> bytes:
        core = self._core
        payload = core.encode_envelope(
            message_type,
            data,
            timestamp if timestamp is not None else MessageClock.now(),
            message_id,
            client_id,
            error,
        )
        frame: bytes = core.build_frame(payload)
        return frame

    def _frame_published(
        self, message_type: str, data: Any, topics: Sequence[str] | None
    ) -> tuple[str, bytes]:
        """Id and frame of a published message, recorded in the history (``topics`` None:
        to all)."""
        _check_message_type(message_type)
        message_id, timestamp = self._clock.next()
        core = self._core
        frame: bytes = core.build_frame(
            core.encode_envelope(str(message_type), data, timestamp, message_id)
        )
        self._published += 1
        # The very frame the core sends (no copy) and the hub's own topic list, which
        # nothing changes after the publish.
        self._history.append(message_id, topics, frame)
        return message_id, frame

    @staticmethod
    def _encode_published(message_type: str, data: Any) -> bytes | None:
        """The ``data`` of a message for the backplane, as JSON: serialized once, here."""
        _check_message_type(message_type)
        # None leaves the envelope without data, as a hub alone does; orjson's
        # JSONEncodeError is a TypeError, as encode_envelope's is.
        return orjson.dumps(data, option=JSON_OPTIONS) if data is not None else None

    def _frame_entry(self, entry: Entry) -> bytes:
        """Frame a message read from the backplane, around its already serialized data."""
        ms = int(entry.message_id.partition("-")[0])
        if ms != self._timestamp_ms:  # one strftime per millisecond, not per message
            self._timestamp_ms = ms
            self._timestamp = rfc3339(ms * 1_000_000)
        core = self._core
        data = orjson.Fragment(entry.data) if entry.data is not None else None
        frame: bytes = core.build_frame(
            core.encode_envelope(entry.message_type, data, self._timestamp, entry.message_id)
        )
        return frame

    def _deliver(self, entry: Entry) -> None:
        """A message came back from the backplane: frame it once and fan it out here."""
        if self._state != "running":
            return
        frame = self._frame_entry(entry)
        topics = entry.topics
        message_id = entry.message_id
        self._published += 1
        self._history.append(message_id, topics, frame)
        if topics is None:
            recipients = int(self._fanout.publish_all(frame))
        else:
            recipients = int(self._fanout.publish_topics(frame, topics))
        if self._returning and entry.origin is not None:
            returned = self._returning.get(entry.origin)
            if returned is not None and not returned.done():
                returned.set_result(recipients)
        if self._pending:
            self._hold(parse_message_id(message_id), topics, frame)

    def _send(self, session: _Session, message_type: str, data: Any = None, **extra: Any) -> None:
        frame = self._frame(message_type, data, client_id=session.client.client_id, **extra)
        self._fanout.send(session.client, frame)

    def _send_error(self, session: _Session, error: ProtocolError) -> None:
        self._protocol_errors += 1
        self._send(session, MessageType.ERROR, error=error.to_error())

    # One client's life

    def _attach(self, connection: Any) -> _Session:
        """Add a client, greet it, replay what it missed (``?since=``) and report bad input.

        One synchronous step: the greeting and the replay are queued before any later
        publish can reach the client, so a resume has neither gap nor duplicate.
        """
        client_id = secrets.token_hex(8)
        query = self._query(connection)
        topics, topics_error = self._initial_topics(query)
        since, since_error = self._initial_since(query)
        errors = [error for error in (topics_error, since_error) if error is not None]
        client = self._core.Client(client_id, connection)
        request = connection.request
        user_agent = request.headers.get("User-Agent") if request is not None else None
        session = _Session(
            client=client,
            connection=connection,
            remote_addr=_format_address(connection.remote_address),
            user_agent=user_agent,
            connected_at=time.time(),
            joined_after=self._last_id(),
        )
        self._sessions[client_id] = session
        greeting: dict[str, Any] = {
            "client_id": client_id,
            "status": "connected",
            "topics": sorted(set(topics)),
        }
        replay = self._history.since(since, topics) if since is not None else None
        if since is not None and replay is not None and self._needs_store(replay):
            # Neither in the core nor greeted yet: nothing can overtake the replay.
            session.pending = _PendingReplay(
                since=since,
                until=self._last_id(),
                topics=frozenset(topics),
                live_topics=None,
                new_topics=tuple(topics),
                delivered_after=None,
                answer=greeting,
                greeting=True,
                errors=errors,
            )
            self._fetch_stored(session)
        else:
            self._fanout.add_client(client)
            self._fanout.subscribe(client, topics)
            frames: list[bytes] = []
            if replay is not None:
                _answer_recovery(greeting, replay.recovered, replay.reason)
                frames = replay.frames
            self._send(session, MessageType.CONNECTION, greeting)
            # Complaints about the URL come right after the greeting, as without a replay.
            for error in errors:
                self._send_error(session, error)
            self._replay(session, frames)
        if self.config.log_connection_events:
            self.logger.info(
                "client %s connected from %s (%d clients)",
                client_id,
                session.remote_addr,
                len(self._sessions),
            )
        return session

    @staticmethod
    def _query(connection: Any) -> dict[str, list[str]]:
        request = connection.request
        path = request.path if request is not None else ""
        return urllib.parse.parse_qs(urllib.parse.urlsplit(path).query, keep_blank_values=True)

    @staticmethod
    def _initial_since(query: dict[str, list[str]]) -> tuple[str | None, ProtocolError | None]:
        """The URL's ``?since=`` id; a malformed one resumes nothing and gets an error."""
        values = query.get("since")
        if not values:
            return None, None
        try:
            parse_message_id(values[-1])
        except ProtocolError as exc:
            exc.message = f"?since= ignored, nothing replayed: {exc.message}"
            return None, exc
        return values[-1], None

    def _last_id(self) -> str:
        """The newest message id this hub has queued for its clients."""
        backplane = self._backplane
        return backplane.position if backplane is not None else self._clock.last_id

    def _needs_store(self, replay: Replay) -> bool:
        """This hub's history could not serve a resume that the backplane's store may."""
        return (
            not replay.recovered
            and self._backplane is not None
            and replay.reason != "history is disabled"
        )

    def _fetch_stored(self, session: _Session) -> None:
        self._pending[session.client.client_id] = session
        self._spawn(self._read_stored(session))

    async def _read_stored(self, session: _Session) -> None:
        """Read a pending resume from the backplane, then send it (see :class:`_PendingReplay`)."""
        pending = session.pending
        backplane = self._backplane
        assert pending is not None and backplane is not None
        try:
            stored = await backplane.entries(pending.since, pending.until)
            # A client back from another hub may have seen messages this one has not read
            # yet: wait for them, so they are held and skipped rather than sent twice.
            since_key = parse_message_id(pending.since)
            async with asyncio.timeout(self.config.write_timeout):
                while stored.recovered and parse_message_id(self._last_id()) < since_key:
                    self._delivered.clear()
                    await self._delivered.wait()
        except BackplaneUnavailable as exc:
            stored = StoredEntries(False, f"history unavailable: {exc}", [])
        except TimeoutError:
            stored = StoredEntries(False, "the backplane did not deliver the message yet", [])
        finally:
            self._pending.pop(session.client.client_id, None)
        if self._sessions.get(session.client.client_id) is session:
            self._send_stored(session, pending, stored)

    def _send_stored(
        self, session: _Session, pending: _PendingReplay, stored: StoredEntries
    ) -> None:
        """Answer a resume read from the backplane: the replay, then what was held meanwhile."""
        client = session.client
        session.pending = None
        if pending.greeting:
            self._fanout.add_client(client)
            session.joined_after = self._last_id()
        self._fanout.subscribe(client, pending.new_topics)
        answer = pending.answer
        _answer_recovery(answer, stored.recovered, stored.reason)
        answer["topics"] = sorted(client.topics)
        self._send(
            session,
            MessageType.CONNECTION if pending.greeting else MessageType.SUBSCRIBED,
            answer,
        )
        for error in pending.errors:
            self._send_error(session, error)
        frames: list[bytes] = []
        held = pending.held
        if stored.recovered:
            delivered_after = (
                parse_message_id(pending.delivered_after)
                if pending.delivered_after is not None
                else None
            )
            live = pending.live_topics or ()
            frames = [
                self._frame_entry(entry)
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
            frames.extend(frame for key, frame in held if key > since_key)
        else:
            frames.extend(frame for _, frame in held)
        self._replay(session, frames)
        # Messages the client sent meanwhile, in order; one may start another resume.
        for message in pending.inbox:
            if not self._receive(session, message):
                self._spawn(
                    self._close(session.connection, CloseCode.INTERNAL_ERROR, "internal error")
                )
                return

    def _hold(self, key: tuple[int, int], topics: Sequence[str] | None, frame: bytes) -> None:
        """Keep a delivered message for clients whose resume is still being read."""
        for session in self._pending.values():
            pending = session.pending
            if pending is None:
                continue
            live = pending.live_topics
            if missed(key, topics, pending.topics, None, ()) and not (
                live is not None and missed(key, topics, live, None, ())
            ):
                pending.held.append((key, frame))
        self._delivered.set()

    def _replay(self, session: _Session, frames: list[bytes]) -> None:
        """Queue recorded frames for one client, in order, behind what it already has."""
        send = self._fanout.send
        client = session.client
        for frame in frames:
            if not send(client, frame):
                break  # the client overflowed (policy "disconnect") or left

    def _initial_topics(
        self, query: dict[str, list[str]]
    ) -> tuple[Sequence[str], ProtocolError | None]:
        """The URL's ``?topics=``, or ``default_topics`` when the URL names none.

        Invalid ``?topics=`` start the client with no subscriptions and an error: falling back
        to the defaults (``"*"``) would flood a client that asked for a few topics.
        """
        if "topics" not in query:
            return self.config.default_topics, None
        names = [name.strip() for value in query["topics"] for name in value.split(",")]
        try:
            topics = parse_topics([name for name in names if name])
            self._check_subscription_limit(0, len(topics))
        except ProtocolError as exc:
            exc.message = f"?topics= rejected, subscribed to nothing: {exc.message}"
            return (), exc
        return topics, None

    def _detach(self, session: _Session) -> None:
        """Forget a client; the second call (stop, then the handler) does nothing."""
        client = session.client
        if self._sessions.pop(client.client_id, None) is None:
            return
        self._pending.pop(client.client_id, None)
        self._fanout.remove_client(client)
        drain = self._drain_tasks.pop(client.client_id, None)
        if drain is not None:
            drain.cancel()
        if self.config.log_connection_events:
            connection = session.connection
            self.logger.info(
                "client %s disconnected (code %s %s; %d clients)",
                client.client_id,
                connection.close_code,
                connection.close_reason or "",
                len(self._sessions),
            )

    async def _serve(self, session: _Session) -> None:
        connection = session.connection
        # With protocol pings the keepalive judges liveness; without them, silence does.
        idle_limit = None if self.config.enable_ping_pong else self.config.read_timeout
        while True:
            try:
                async with asyncio.timeout(idle_limit):
                    message = await connection.recv()
            except TimeoutError:
                await self._close(connection, CloseCode.INTERNAL_ERROR, "read timeout")
                return
            except ConnectionClosed:
                return
            if not self._receive(session, message):
                await self._close(connection, CloseCode.INTERNAL_ERROR, "internal error")
                return

    def _receive(self, session: _Session, message: str | bytes) -> bool:
        """Act on one client message; False when the client must be closed (1011).

        Bad input is answered with an ``error`` envelope by :meth:`_handle`; only a failure
        inside the hub gets here, and ``disconnect_on_error`` decides what it costs the client.
        """
        if session.pending is not None:
            # Answered after the resume being read, in the order the client sent them.
            session.pending.inbox.append(message)
            return True
        try:
            self._handle(session, message)
        except Exception:
            self.logger.exception(
                "error handling a message from client %s", session.client.client_id
            )
            if self.config.disconnect_on_error:
                return False
            self._send(
                session, MessageType.ERROR, error={"code": 500, "message": "internal error"}
            )
        return True

    def _handle(self, session: _Session, message: str | bytes) -> None:
        try:
            request = parse_client_message(message)
            if request.type is MessageType.SUBSCRIBE:
                self._subscribe(session, request.topics, request.since)
            elif request.type is MessageType.UNSUBSCRIBE:
                self._unsubscribe(session, request.topics)
            elif request.type is MessageType.PING:
                session.last_ping = time.time()
                self._send(session, MessageType.PONG)
            else:
                session.last_ping = time.time()
        except ProtocolError as exc:
            self._send_error(session, exc)

    def _subscribe(self, session: _Session, topics: tuple[str, ...], since: str | None) -> None:
        """Subscribe, answer and, with ``since``, replay what the client missed: in one
        synchronous step, so later publishes queue behind the replay."""
        client = session.client
        new = [topic for topic in topics if topic not in client.topics]
        self._check_subscription_limit(len(client.topics), len(new))
        held = frozenset(client.topics)
        if since is None:
            self._fanout.subscribe(client, new)
            self._send(session, MessageType.SUBSCRIBED, {"topics": sorted(client.topics)})
            return
        # What this connection already received live (published after it joined, to all or
        # to a topic it held) is left out of the replay.
        every_topic = held.union(new)
        replay = self._history.since(
            since,
            every_topic,
            delivered_after=session.joined_after,
            delivered_topics=held,
        )
        answer: dict[str, Any] = {}
        if self._needs_store(replay):
            session.pending = _PendingReplay(
                since=since,
                until=self._last_id(),
                topics=every_topic,
                live_topics=held,
                new_topics=tuple(new),
                delivered_after=session.joined_after,
                answer=answer,
                greeting=False,
                errors=[],
            )
            self._fetch_stored(session)
            return
        self._fanout.subscribe(client, new)
        answer["topics"] = sorted(client.topics)
        _answer_recovery(answer, replay.recovered, replay.reason)
        self._send(session, MessageType.SUBSCRIBED, answer)
        self._replay(session, replay.frames)

    def _unsubscribe(self, session: _Session, topics: tuple[str, ...]) -> None:
        client = session.client
        self._fanout.unsubscribe(client, topics)
        self._send(session, MessageType.UNSUBSCRIBED, {"topics": sorted(client.topics)})

    def _check_subscription_limit(self, current: int, adding: int) -> None:
        limit = self.config.max_subscriptions
        if current + adding > limit:
            raise ProtocolError(
                f"too many subscriptions: at most {limit} topics per client",
                {"limit": limit, "subscribed": current, "requested": adding},
            )

    # Slow consumers

    def _on_overflow(self, client: Any) -> None:
        """The core found ``client``'s buffer full under the "disconnect" policy."""
        self._disconnect_slow(client, "its buffer overflowed")

    def _disconnect_slow(self, client: Any, why: str) -> None:
        self._slow_consumer_disconnects += 1
        self._fanout.remove_client(client)
        self.logger.warning("closing slow client %s: %s", client.client_id, why)
        self._spawn(self._close(client.connection, SLOW_CONSUMER_CLOSE_CODE, "slow consumer"))

    def _on_blocked(self, client: Any) -> None:
        """The core holds frames for ``client`` until its transport drains."""
        task = self._spawn(self._wait_writable(client))
        self._drain_tasks[client.client_id] = task

    async def _wait_writable(self, client: Any) -> None:
        connection = client.connection
        try:
            async with asyncio.timeout(self.config.write_timeout):
                while connection.send_in_progress is not None:
                    await asyncio.shield(connection.send_in_progress)
                await connection.drain()
        except TimeoutError:
            self._drain_tasks.pop(client.client_id, None)
            if not client.closed:
                self._disconnect_slow(
                    client, f"its transport did not drain in {self.config.write_timeout}s"
                )
            return
        except Exception:  # the connection was lost; its handler cleans up
            self._drain_tasks.pop(client.client_id, None)
            return
        self._drain_tasks.pop(client.client_id, None)
        self._fanout.unblock(client)

    async def _close(self, connection: Any, code: int, reason: str) -> None:
        """Close with ``code``; abort the transport if the peer has not answered in time."""
        try:
            async with asyncio.timeout(self.config.write_timeout):
                await connection.close(code, reason)
        except TimeoutError:
            connection.transport.abort()

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _describe(self, session: _Session) -> dict[str, Any]:
        client = session.client
        transport = session.connection.transport
        in_transport = transport.get_write_buffer_size() if not transport.is_closing() else 0
        return {
            "id": client.client_id,
            "remote_addr": session.remote_addr,
            "user_agent": session.user_agent,
            "connected_at": rfc3339(int(session.connected_at * 1e9)),
            "last_ping": (
                rfc3339(int(session.last_ping * 1e9)) if session.last_ping is not None else None
            ),
            "subscriptions": sorted(client.topics),
            "messages_sent": client.messages_sent,
            "messages_dropped": client.messages_dropped,
            "buffered_bytes": client.buffered_bytes + in_transport,
        }


def _answer_recovery(answer: dict[str, Any], recovered: bool, reason: str | None) -> None:
    answer["recovered"] = recovered
    if reason is not None:
        answer["reason"] = reason


def _check_message_type(message_type: Any) -> None:
    if not isinstance(message_type, str) or not message_type:
        raise TypeError(f"message_type must be a non-empty string, got {message_type!r}")
    if message_type in PROTOCOL_TYPES:
        raise ValueError(
            f"message_type {message_type!r} is reserved for the protocol; "
            "publish events under types of their own"
        )


def _topic_list(topics: Iterable[str] | str) -> list[str]:
    if isinstance(topics, str):
        return [topics]
    topic_list = list(topics)
    for topic in topic_list:
        if not isinstance(topic, str):
            raise TypeError(f"topics must be strings, got {topic!r}")
    return topic_list


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
