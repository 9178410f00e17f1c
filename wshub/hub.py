"""The hub: lifecycle, admission and publishing.

Publishing is synchronous and never awaits: it serializes the message once and hands it to
the fan-out core, which frames it once per wire encoding in use, queues it for every
recipient and writes each client's queue in one call at the end of the event-loop iteration.

Hubs joined by a :class:`~wshub.redis_backplane.RedisBackplane` send each publish to Redis
instead, and frame and fan out every message when it comes back from the shared stream, in the
one order all of them see.

The rest lives in modules of its own: the session port (:mod:`wshub.session`) that transports
call, the client protocol (:mod:`wshub.clients`), resumes (:mod:`wshub.resume`), slow
consumers (:mod:`wshub.policies`) and the runner's ``notify_*`` methods (:mod:`wshub.runner`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import threading
from collections.abc import Awaitable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

from .audience import SHARE_EVERY, SHARED_FOR, Audience, total
from .auth import AuthenticateHook, Authenticator, AuthUnavailable, TokenRefused
from .backplane import Added, Backplane, BackplaneUnavailable, Entry
from .clients import Clients, ClientSession
from .compression import SharedDeflate
from .config import HubConfig
from .fanout import Framer, Implementation, core_module, encode_data
from .history import History, MemoryHistory
from .idempotency import IdempotencyKeys, check_idempotency_key
from .logs import RateLimitedLog
from .policies import SlowConsumers
from .redis_backplane import RedisBackplane
from .resume import Resumer
from .runner import RunnerNotifications
from .session import Admission, ClientTransport, HandshakeRequest, Refusal
from .snapshot import Retained, Retention, State
from .wire import (
    MessageClock,
    MessageTooLarge,
    MessageType,
    check_envelope_size,
    check_message_key,
    check_message_type,
    parse_message_id,
    topic_list,
)

__all__ = ["BroadcastBufferFull", "Hub", "Published"]

_GOING_AWAY = 1001
_POLICY_VIOLATION = 1008
_TRY_AGAIN_LATER = 1013
# Closes for a client whose credentials do not admit it (the 401 of a handshake that a
# transport accepted before asking); also a token that expired while connected.
UNAUTHORIZED = 4001


class BroadcastBufferFull(RuntimeError):
    """``publish_threadsafe`` found ``broadcast_buffer_size`` messages already waiting."""


class Published(NamedTuple):
    """What :meth:`Hub.publish` did.

    Attributes:
        id: The message's id, global across hubs joined by a backplane.
        recipients: How many clients of this hub it was queued for; None when this hub had
            not read it back from the backplane within ``write_timeout``; 0 for a duplicate.
        duplicate: True when its idempotency key had been published within
            ``idempotency_window``: ``id`` is the first publish's, and nothing was sent again.
    """

    id: str
    recipients: int | None
    duplicate: bool = False


class Hub(RunnerNotifications):
    """A WebSocket fan-out hub; transports reach it through :class:`wshub.session.SessionHost`.

    Args:
        config: Settings; :class:`HubConfig` defaults when None.
        logger: Where the hub logs; the ``"wshub"`` logger when None.
        implementation: ``"cython"`` or ``"python"`` to pick a fan-out core; None takes
            :data:`wshub.IMPLEMENTATION`.
        backplane: Joins this hub with others; None makes a
            :class:`~wshub.redis_backplane.RedisBackplane` when ``config.redis_url`` is set and
            runs the hub alone otherwise.
        authenticate: Who a handshake's client is, beside or instead of tokens: see
            :data:`wshub.auth.AuthenticateHook`. Called once per connection, bounded by
            ``auth_timeout``.

    Raises:
        ImportError: ``implementation="cython"`` and the extension is not built, or
            ``redis_url`` is set and redis-py is not installed.
        ValueError: ``auth_required`` is set and nothing can authenticate clients.
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        implementation: Implementation | None = None,
        backplane: Backplane | None = None,
        authenticate: AuthenticateHook | None = None,
    ) -> None:
        config = config if config is not None else HubConfig()
        if not isinstance(config, HubConfig):
            raise TypeError(f"config must be a HubConfig, got {config!r}")
        self._config = config
        self.logger = logger if logger is not None else logging.getLogger("wshub")
        self._auth = Authenticator(config, authenticate, RateLimitedLog(self.logger))
        self._core = core_module(implementation)
        self.implementation: Implementation = (
            "python" if self._core.__name__.endswith("_py") else "cython"
        )
        self._framer = Framer(self._core)
        # One compression per message for every client that negotiated it (None: plain only).
        self._deflate = (
            SharedDeflate(config.compression_min_size) if config.compression == "deflate" else None
        )
        self._state = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fanout: Any = None
        self._clients: Clients | None = None
        self._clock = MessageClock()
        self._history: History = MemoryHistory(config.history_size, config.history_ttl)
        retention = Retention.of(config)
        self._retained = State(retention)
        if backplane is None and config.redis_url is not None:
            backplane = RedisBackplane(
                config.redis_url,
                stream=config.redis_stream,
                history_size=config.history_size,
                history_ttl=config.history_ttl,
                idempotency_window=config.idempotency_window,
                retention=retention,
                logger=self.logger,
            )
        self._backplane = backplane
        # Alone, the hub remembers its own keys; a backplane remembers them for all hubs.
        self._keys = IdempotencyKeys(config.idempotency_window)
        self._resumer = Resumer(
            self._history,
            backplane,
            self._framer,
            self._last_id,
            config.write_timeout,
            config.client_buffer_size,
        )
        # With a backplane: publishes awaiting their return.
        self._origin = secrets.token_hex(6)
        self._origin_sequence = 0
        self._returning: dict[str, asyncio.Future[int | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._threadsafe_lock = threading.Lock()
        self._threadsafe_waiting = 0
        self._published = 0
        self._rejected = 0

    @property
    def config(self) -> HubConfig:
        """The hub's settings."""
        return self._config

    # Lifecycle

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`: the hub accepts clients and messages."""
        return self._state == "running"

    @property
    def event_format(self) -> str:
        """The shape of the runner's events this hub publishes (``config.event_format``)."""
        return self._config.event_format

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
        clients: Clients | None = None

        def overflowed(client: Any) -> None:
            assert clients is not None
            clients.slow.overflowed(client)

        def blocked(client: Any) -> None:
            assert clients is not None
            clients.slow.blocked(client)

        self._fanout = self._core.Fanout(
            self._loop,
            client_buffer_size=config.client_buffer_size,
            max_buffered_bytes=config.max_buffered_bytes,
            policy=SlowConsumers.core_policy(self._core, config),
            flush_interval=config.flush_interval,
            on_overflow=overflowed,
            on_blocked=blocked,
            deflate=self._deflate,
        )
        clients = self._clients = Clients(
            config,
            self.logger,
            core=self._core,
            fanout=self._fanout,
            framer=self._framer,
            resumer=self._resumer,
            state=self._retained,
            last_id=self._last_id,
            spawn=self._spawn,
            verify=self._auth.verify,
        )
        self._state = "running"
        if self._backplane is not None:
            await self._backplane.start(self._deliver, self._missed)
            if not await self._restore_state():
                self._spawn(self._keep_restoring())
            self._spawn(self._share_audience())
        self.logger.debug("hub started with the %s fan-out core", self.implementation)

    async def stop(self) -> None:
        """Flush, say goodbye and close every client with 1001. Safe to call at any time.

        Frames already queued are written first, then every client gets a ``disconnection``
        message; waiting for slow clients and for closing handshakes is bounded by
        ``write_timeout`` each, after which their transports are aborted.
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
        clients = self._clients
        assert clients is not None
        timeout = self.config.write_timeout
        if self._backplane is not None:
            await self._backplane.close()
            for returned in self._returning.values():
                if not returned.done():  # published, but it will not come back here
                    returned.set_result(None)
        goodbye = self._framer.reply(MessageType.DISCONNECTION, {"reason": "server shutdown"})
        fanout.publish_all(goodbye)
        fanout.flush()
        await clients.slow.wait_drained(timeout)
        await clients.close_all(_GOING_AWAY, "server shutdown", timeout)
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

    # The session port (wshub.session.SessionHost)

    def admit(
        self, request: HandshakeRequest
    ) -> Admission | Refusal | Awaitable[Admission | Refusal]:
        """Whether a handshake may be accepted and who its client is, or why not (see
        :meth:`wshub.session.SessionHost.admit`): at once, or an awaitable when an
        ``authenticate`` hook or a key set must be asked. Refusals are counted by reason in
        ``refused_handshakes``, those for capacity in ``rejected_connections`` too."""
        refusal = self._check_capacity(request)
        if refusal is not None:
            return refusal
        if self._auth.waits:
            return self._admit_later(request)
        try:
            return Admission(request, self._auth.authenticate_now(request))
        except TokenRefused as exc:
            return _token_refusal(exc)

    async def _admit_later(self, request: HandshakeRequest) -> Admission | Refusal:
        try:
            return Admission(request, await self._auth.authenticate(request))
        except TokenRefused as exc:
            return _token_refusal(exc)

    def _check_capacity(self, request: HandshakeRequest) -> Refusal | None:
        """What admission checks twice: before the handshake and once it is accepted."""
        if self._state != "running":
            return self._refused("stopping", Refusal(503, "Hub is not running", _GOING_AWAY))
        allowed = self.config.allowed_origins
        origin = request.origin
        # Browsers always send Origin; other clients may omit it and are let through.
        if allowed is not None and origin is not None and origin not in allowed:
            refusal = Refusal(403, f"Origin {origin[:200]!r} is not allowed", _POLICY_VIOLATION)
            return self._refused("origin", refusal)
        if self.client_count >= self.config.max_clients:
            self._rejected += 1
            return self._refused("capacity", Refusal(503, "Too many clients", _TRY_AGAIN_LATER))
        per_ip = self.config.max_connections_per_ip
        if (
            per_ip
            and self._clients is not None
            and self._clients.connections_from(request) >= per_ip
        ):
            self._rejected += 1
            refusal = Refusal(429, "Too many connections from this address", _TRY_AGAIN_LATER)
            return self._refused("per_address", refusal)
        return None

    def _refused(self, reason: str, refusal: Refusal) -> Refusal:
        refused = self._auth.refused
        refused[reason] = refused.get(reason, 0) + 1
        return refusal

    def open_session(
        self, transport: ClientTransport, admission: Admission
    ) -> ClientSession | Refusal:
        """Take a client whose handshake was accepted (see
        :meth:`wshub.session.SessionHost.open_session`)."""
        refusal = self._check_capacity(admission.request)
        if refusal is not None:
            return refusal
        assert self._clients is not None
        return self._clients.open(transport, admission)

    async def register(self, connection: Any) -> None:
        """Serve an accepted websockets connection as a hub client until it closes.

        This is the connection handler: pass :attr:`handler` to
        ``websockets.asyncio.server.serve``, or await this from your own handler after
        routing. See :mod:`wshub.transports.websockets`.
        """
        from .transports.websockets import serve_connection  # the transport depends on us

        await serve_connection(self, connection)

    handler = register
    """The connection handler for ``websockets.asyncio.server.serve``."""

    # Introspection

    @property
    def client_count(self) -> int:
        """How many clients are connected."""
        return len(self._clients.sessions) if self._clients is not None else 0

    def session(self, client_id: str) -> ClientSession | None:
        """The session of a connected client (its ``transport``, ``client`` and the rest of
        :class:`wshub.clients.ClientSession`); None when no such client is connected."""
        clients = self._clients
        return clients.sessions.get(client_id) if clients is not None else None

    def watchers(self, topic: str) -> int:
        """How many of this hub's clients a message published to ``topic`` would reach now:
        those subscribed to it or to ``"*"``. A runner may publish fine-grained progress
        only while someone watches.

        Raises:
            ValueError: ``topic`` is not a valid topic (TypeError: not a string).
        """
        topic_list(topic)
        fanout = self._fanout
        if fanout is None:
            return 0
        wildcard = fanout.index.get("*", {})
        if topic == "*":
            return len(wildcard)
        direct = fanout.index.get(topic, {})
        return len(wildcard) + sum(1 for client in direct if client not in wildcard)

    def local_audience(self) -> Audience:
        """Who among this hub's clients watches what, by topic (see :mod:`wshub.audience`).

        Costs the number of topics held plus the topics of the ``"*"`` clients, not every
        subscription: a topic's watchers are its subscribers and the ``"*"`` clients, less
        those that hold both.
        """
        fanout = self._fanout
        index: dict[str, Any] = fanout.index if fanout is not None else {}
        wildcard = index.get("*", {})
        both: dict[str, int] = {}
        for client in wildcard:
            for topic in client.topics:
                both[topic] = both.get(topic, 0) + 1
        everyone = len(wildcard)
        return Audience(
            everyone,
            {
                topic: (len(held), everyone + len(held) - both.get(topic, 0))
                for topic, held in index.items()
                if topic != "*"
            },
        )

    async def audience(self) -> Audience:
        """Who watches what on every hub joined with this one (this hub alone: its own);
        ``hubs`` says how many are counted. Each hub shares its own through the backplane
        every :data:`~wshub.audience.SHARE_EVERY` seconds, so the others' counts may be that
        old; while the backplane cannot be asked, this hub's alone."""
        here = self.local_audience()
        backplane = self._backplane
        if backplane is None or self._state != "running":
            return here
        try:
            reports = await backplane.audiences()
        except BackplaneUnavailable:
            return here
        others = []
        for node, report in reports.items():
            if node == self._origin:
                continue  # this hub's own, fresher than what it shared
            try:
                others.append(Audience.decode(report))
            except (ValueError, KeyError, TypeError):
                continue  # not written by a hub
        return total([here, *others])

    async def _share_audience(self) -> None:
        """Tell the joined hubs who watches what here, every SHARE_EVERY seconds."""
        backplane = self._backplane
        assert backplane is not None
        while self._state == "running":
            with contextlib.suppress(BackplaneUnavailable):
                await backplane.share_audience(
                    self._origin, self.local_audience().encode(), SHARED_FOR
                )
            await asyncio.sleep(SHARE_EVERY)

    def topic_subscribers(self) -> dict[str, int]:
        """How many of this hub's clients hold each topic that some client holds (``"*"``
        included), by topic."""
        fanout = self._fanout
        if fanout is None:
            return {}
        return {topic: len(subscribers) for topic, subscribers in fanout.index.items()}

    def client_info(self) -> list[dict[str, Any]]:
        """A snapshot of every connected client, as JSON-ready dictionaries."""
        clients = self._clients
        if clients is None:
            return []
        return [clients.describe(session) for session in clients.sessions.values()]

    def stats(self) -> dict[str, Any]:
        """Counters since start: clients, messages and bytes, drops and errors, handshakes
        refused by reason, what is retained for snapshots now (``retained_keys``,
        ``retained_events``; expired ones until a snapshot drops them), and the backplane's
        (None when the hub runs alone)."""
        fanout = self._fanout
        clients = self._clients
        backplane = self._backplane.stats() if self._backplane is not None else None
        return {
            "implementation": self.implementation,
            "clients": self.client_count,
            "messages_published": self._published,
            "deliveries": fanout.deliveries if fanout is not None else 0,
            "drops": fanout.drops if fanout is not None else 0,
            "conflated": fanout.conflations if fanout is not None else 0,
            "bytes_sent": fanout.bytes_sent if fanout is not None else 0,
            "writes": fanout.writes if fanout is not None else 0,
            "compressed_clients": clients.compressed if clients is not None else 0,
            "messages_compressed": self._deflate.compressed if self._deflate is not None else 0,
            "slow_consumer_disconnects": clients.slow.disconnects if clients is not None else 0,
            "protocol_errors": clients.protocol_errors if clients is not None else 0,
            "rate_limited": clients.rate_limited if clients is not None else 0,
            "rejected_connections": self._rejected,
            "refused_handshakes": dict(self._auth.refused),
            "retained_keys": self._retained.keys,
            "retained_events": self._retained.events,
            "publish_failures": backplane["publish_failures"] if backplane is not None else 0,
            "backplane": backplane,
        }

    def flush(self) -> None:
        """Write what is queued for every client now, instead of at the end of this loop
        iteration (the benchmark's unbatched variant uses it)."""
        if self._fanout is not None:
            self._fanout.flush()

    # Publishing

    async def publish(
        self,
        message_type: str,
        data: Any = None,
        topics: Iterable[str] | str | None = None,
        *,
        idempotency_key: str | None = None,
        key: str | None = None,
    ) -> Published:
        """Publish to every client subscribed to one of ``topics`` (or to ``"*"``), or to every
        client when ``topics`` is None, on this hub and on every hub joined with it.

        Alone, the hub queues the message at once. With a backplane, this returns once the
        backplane took the message and this hub read it back and queued it for its clients.

        With ``idempotency_key``, publishing again under the same key within
        ``idempotency_window`` (on any hub of a backplane) sends nothing and answers the first
        publish's id with ``duplicate`` True: after an outcome-unknown failure, publish again
        with the same key, and the message is delivered once whatever happened to the first.

        With ``key`` (such as ``"run:42"``), a newer message with the same key supersedes
        this one in the queue of a client that fell behind (``slow_client_policy`` "conflate"):
        give one to messages that are the current state of something, none to events a
        client must not lose.

        Returns:
            The message's id and how many clients of this hub it was queued for.

        Raises:
            TypeError: ``data`` cannot be serialized, or a topic is not a string.
            ValueError: ``message_type`` is one the protocol uses, a topic is empty or
                longer than 256 characters, or ``idempotency_key`` or ``key`` is empty or
                too long.
            MessageTooLarge: The message would exceed ``max_publish_size`` (a ValueError).
            BackplaneUnavailable: The backplane could not take it. Its ``outcome`` says
                whether it was not published (Redis was known to be unreachable) or the
                outcome is unknown (sent, unanswered: it may be delivered yet).
            RuntimeError: The hub is not running.
        """
        if self._state != "running":
            raise RuntimeError("the hub is not running")
        topic_names = topic_list(topics) if topics is not None else None
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        if key is not None:
            check_message_key(key)
        backplane = self._backplane
        if backplane is None:
            if idempotency_key is None:
                return Published(*self._publish_here(message_type, data, topic_names, key))
            first = self._keys.get(idempotency_key)
            if first is not None:
                return Published(first, 0, duplicate=True)
            published = Published(*self._publish_here(message_type, data, topic_names, key))
            self._keys.put(idempotency_key, published.id)
            return published
        check_message_type(message_type)
        payload = encode_data(data)
        self._check_size(message_type, payload)
        self._origin_sequence += 1
        origin = f"{self._origin}:{self._origin_sequence}"
        returned: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._returning[origin] = returned
        try:
            added = await backplane.publish(
                message_type, payload, topic_names, origin, idempotency_key, key
            )
            if added.duplicate:
                return Published(added.message_id, 0, duplicate=True)
            try:
                async with asyncio.timeout(self.config.write_timeout):
                    recipients: int | None = await returned
            except TimeoutError:
                recipients = None
        finally:
            self._returning.pop(origin, None)
        return Published(added.message_id, recipients)

    def broadcast_to_all(
        self, message_type: str, data: Any = None, *, key: str | None = None
    ) -> int:
        """Queue a message for every connected client, whatever it subscribed to; ``key``
        as in :meth:`publish`.

        With a backplane the message goes to the backplane and is queued when it comes back,
        so the count is not known yet: 0 is returned. A failure on the way is logged and
        counted (``publish_failures``); ``await`` :meth:`publish` to learn of it instead.

        Returns:
            How many clients it was queued for; 0 when the hub is not running.

        Raises:
            TypeError: ``data`` cannot be serialized, or ``message_type`` is not a string.
            ValueError: ``message_type`` is one the protocol uses (``connection``, ``error``,
                ``subscribed``, ...), or ``key`` is empty or too long.
            MessageTooLarge: The message would exceed ``max_publish_size``.
            BackplaneUnavailable: The backplane is known to be unreachable.
        """
        return self._broadcast(message_type, data, None, key)

    def broadcast_to_subscribers(
        self,
        message_type: str,
        data: Any,
        topics: Iterable[str] | str,
        *,
        key: str | None = None,
    ) -> int:
        """Queue a message for every client subscribed to one of ``topics`` or to ``"*"``;
        ``key`` as in :meth:`publish`.

        A client matching several topics receives the message once. With a backplane, see
        :meth:`broadcast_to_all`.

        Returns:
            How many clients it was queued for; 0 when the hub is not running.

        Raises:
            TypeError: ``data`` cannot be serialized, or a topic is not a string.
            ValueError: ``message_type`` is one the protocol uses, a topic is empty or
                longer than 256 characters, or ``key`` is empty or too long.
            MessageTooLarge: The message would exceed ``max_publish_size``.
            BackplaneUnavailable: The backplane is known to be unreachable.
        """
        return self._broadcast(message_type, data, topics, key)

    def _broadcast(
        self,
        message_type: str,
        data: Any,
        topics: Iterable[str] | str | None,
        key: str | None,
    ) -> int:
        """The synchronous publish behind both ``broadcast_*`` (``topics`` None: to all)."""
        if self._state != "running":
            return 0
        topic_names = topic_list(topics) if topics is not None else None
        if key is not None:
            check_message_key(key)
        if self._backplane is not None:
            self._send_to_backplane(message_type, data, topic_names, key)
            return 0
        return self._publish_here(message_type, data, topic_names, key)[1]

    def _publish_here(
        self, message_type: str, data: Any, topics: list[str] | None, key: str | None
    ) -> tuple[str, int]:
        """Publish without a backplane: id, serialization, history and fan-out in one step."""
        check_message_type(message_type)
        message_id, timestamp = self._clock.next()
        message = self._framer.published(str(message_type), data, message_id, timestamp, key)
        limit = self.config.max_publish_size
        if len(message.payload) > limit:
            raise MessageTooLarge(len(message.payload), limit)
        return message_id, self._fan_out(message_id, topics, message)

    def _check_size(self, message_type: str, payload: bytes | None) -> None:
        """Refuse, before it leaves for the backplane, a message that could be too large."""
        size = len(payload) if payload is not None else 0
        check_envelope_size(message_type, size, self.config.max_publish_size)

    def _fan_out(self, message_id: str, topics: Sequence[str] | None, message: Any) -> int:
        """Record a message in the history and queue it for its recipients here."""
        self._published += 1
        # The very message the core sends (no copy) and the hub's own topic list, which
        # nothing changes after the publish.
        self._history.append(message_id, topics, message)
        self._retained.record(message_id, topics, message.key, message)
        fanout = self._fanout
        if topics is None:
            return int(fanout.publish_all(message))
        return int(fanout.publish_topics(message, topics))

    def _send_to_backplane(
        self, message_type: str, data: Any, topics: list[str] | None, key: str | None
    ) -> None:
        assert self._backplane is not None
        check_message_type(message_type)
        payload = encode_data(data)
        self._check_size(message_type, payload)
        future = self._backplane.publish(message_type, payload, topics, key=key)
        future.add_done_callback(self._sent_to_backplane)

    def _sent_to_backplane(self, future: asyncio.Future[Added]) -> None:
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
        *,
        key: str | None = None,
    ) -> concurrent.futures.Future[int]:
        """Publish from another thread: to ``topics``, or to every client when None; ``key``
        as in :meth:`publish`.

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
                self._publish_from_thread, message_type, data, topics, key, future
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
        key: str | None,
        future: concurrent.futures.Future[int],
    ) -> None:
        with self._threadsafe_lock:
            self._threadsafe_waiting -= 1
        if self._backplane is not None and self._state == "running":
            self._spawn(self._publish_for_thread(message_type, data, topics, key, future))
            return
        try:
            count = self._broadcast(message_type, data, topics, key)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(count)

    async def _publish_for_thread(
        self,
        message_type: str,
        data: Any,
        topics: Iterable[str] | str | None,
        key: str | None,
        future: concurrent.futures.Future[int],
    ) -> None:
        try:
            published = await self.publish(message_type, data, topics, key=key)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(published.recipients or 0)

    # Messages from the backplane

    def _deliver(self, entry: Entry) -> None:
        """A message came back from the backplane: frame it once and fan it out here."""
        if self._state != "running":
            return
        message = self._framer.stored(entry.message_type, entry.data, entry.message_id, entry.key)
        recipients = self._fan_out(entry.message_id, entry.topics, message)
        if self._returning and entry.origin is not None:
            returned = self._returning.get(entry.origin)
            if returned is not None and not returned.done():
                returned.set_result(recipients)
        if self._resumer.pending:
            self._resumer.delivered(parse_message_id(entry.message_id), entry.topics, message)

    def _missed(self, count: int | None, after: str) -> None:
        """Messages left the backplane before this hub read them: tell every client.

        Which topics they had is gone with them, so every client is told: a ``gap`` says
        that what it holds may be incomplete after ``after`` (wshub.js reports it, and the
        dashboard offers a reload).
        """
        if self._state != "running" or self._fanout is None:
            return
        data = {"missed": count, "after": after}
        self._fanout.publish_all(self._framer.reply(MessageType.GAP, data))
        # What was missed may be a key's latest: take the state the backplane retained.
        self._spawn(self._keep_restoring())

    async def _restore_state(self) -> bool:
        """Take the state the backplane retained (what hubs delivered before this one
        started, or while it fell behind), so snapshots show it; False when it cannot be
        read now."""
        backplane = self._backplane
        assert backplane is not None
        try:
            entries = await backplane.retained()
        except BackplaneUnavailable:
            return False
        stored = self._framer.stored
        # Later entries are still on their way to this hub: they are recorded as they
        # arrive, and a snapshot must not show what a client will then get live.
        delivered = parse_message_id(self._last_id())
        ids = [(parse_message_id(entry.message_id), entry) for entry in entries]
        self._retained.merge(
            Retained(
                key,
                entry.message_id,
                entry.topics,
                entry.key,
                stored(entry.message_type, entry.data, entry.message_id, entry.key),
            )
            for key, entry in ids
            if key <= delivered
        )
        return True

    async def _keep_restoring(self) -> None:
        """:meth:`_restore_state` until it works, with a growing delay."""
        delay = 0.1
        while self._state == "running" and not await self._restore_state():
            if delay == 0.1:
                self.logger.warning(
                    "the backplane's retained state cannot be read yet: snapshots may lack "
                    "what other hubs delivered; retrying"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _last_id(self) -> str:
        """The newest message id this hub has queued for its clients."""
        backplane = self._backplane
        return backplane.position if backplane is not None else self._clock.last_id

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _token_refusal(refused: TokenRefused) -> Refusal:
    """401 for credentials the hub refuses; 503 when nothing could decide."""
    if isinstance(refused, AuthUnavailable):
        return Refusal(503, refused.message[:200], _TRY_AGAIN_LATER)
    return Refusal(401, refused.message[:200], UNAUTHORIZED, _challenge(refused))


def _challenge(refused: TokenRefused) -> tuple[tuple[str, str], ...]:
    """The ``WWW-Authenticate`` header of a 401 (RFC 6750 3): without credentials, the
    scheme alone; with a refused token, why."""
    if refused.reason == "missing":
        return (("WWW-Authenticate", 'Bearer realm="wshub"'),)
    description = refused.message.replace('"', "'")[:200]
    value = f'Bearer realm="wshub", error="invalid_token", error_description="{description}"'
    return (("WWW-Authenticate", value),)
