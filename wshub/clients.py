"""The client protocol: greeting, subscribe, unsubscribe, ping, errors and resumes.

Sans-I/O: a :class:`ClientSession` is what a transport talks to (it implements
:class:`wshub.session.ClientSession`); :class:`Clients` holds every session and answers
their messages by queueing replies in the fan-out core. Nothing here touches a socket, so the
tests drive it through an in-memory transport as well as over real ones.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from types import ModuleType
from typing import Any

from .auth import AuthUnavailable, Principal, TokenRefused
from .backplane import StoredEntries
from .config import HubConfig
from .fanout import Framer
from .history import Replay
from .limits import (
    CONTROL_FRAME_COST,
    MESSAGE_COST,
    POLICY_VIOLATION,
    RATE_LIMITED,
    RESUME_COST,
    RateLimit,
    client_address,
    proxy_networks,
)
from .logs import RateLimitedLog, count_of
from .policies import SlowConsumers
from .resume import PendingReplay, Resumer, answer_recovery
from .session import Admission, ClientTransport, HandshakeRequest
from .snapshot import State
from .wire import (
    MessageType,
    ProtocolError,
    parse_client_message,
    parse_message_id,
    parse_topics,
    rfc3339,
)

__all__ = ["INTERNAL_ERROR", "TOKEN_EXPIRED", "ClientSession", "Clients"]

INTERNAL_ERROR = 1011
TOKEN_EXPIRED = 4001
_UNAUTHORIZED = 401
_FORBIDDEN = 403
_UNAVAILABLE = 503


class ClientSession:
    """One connected client, as the hub knows it; its transport calls these methods.

    Attributes:
        client: Its place in the fan-out core (subscriptions, buffer, counters).
        transport: The connection it arrived on.
        remote_addr: The peer, ``host:port``.
        user_agent: The ``User-Agent`` of its handshake.
        connected_at: When it joined (seconds since the epoch).
        joined_after: The last message id issued before it joined: later messages reached it
            live.
        last_ping: When it last sent ``ping`` or ``pong`` (seconds since the epoch).
        pending: Its resume being read from the backplane, if any.
        limit: What it may still send (``client_message_rate``).
        address: The address it connects from, through trusted proxies
            (``max_connections_per_ip``).
        principal: Who it is and what it may subscribe to; a ``refresh`` replaces it.
        expiry: The timer of its token's expiry, then of the grace period after it.
        refreshing: Messages that arrived while its ``refresh`` was verified, in order
            (None: refused over the rate limit); None when no refresh is being verified.
    """

    __slots__ = (
        "_clients",
        "address",
        "client",
        "connected_at",
        "expiry",
        "joined_after",
        "last_ping",
        "limit",
        "pending",
        "principal",
        "refreshing",
        "remote_addr",
        "transport",
        "user_agent",
    )

    def __init__(
        self,
        clients: Clients,
        client: Any,
        transport: ClientTransport,
        admission: Admission,
        joined_after: str,
    ) -> None:
        request = admission.request
        self._clients = clients
        self.client = client
        self.transport = transport
        self.principal = admission.principal
        self.expiry: asyncio.TimerHandle | None = None
        self.refreshing: list[str | bytes | None] | None = None
        self.remote_addr = request.remote_address
        self.user_agent = request.user_agent
        self.connected_at = time.time()
        self.joined_after = joined_after
        self.last_ping: float | None = None
        self.pending: PendingReplay | None = None
        self.address = clients.address_of(request)
        config = clients.config
        self.limit = RateLimit(
            config.client_message_rate, config.client_message_burst, time.monotonic()
        )

    @property
    def client_id(self) -> str:
        """The client's id."""
        client_id: str = self.client.client_id
        return client_id

    @property
    def identity(self) -> str | None:
        """Who the client authenticated as (its token's ``sub``); None when anonymous."""
        return self.principal.identity

    @property
    def name(self) -> str:
        """The client as log lines name it: its id, and its identity when it has one."""
        identity = self.principal.identity
        client_id = self.client_id
        return client_id if identity is None else f"{client_id} ({identity[:64]!r})"

    def received(self, message: str | bytes) -> None:
        """A whole message arrived from the client."""
        self._clients.received(self, message)

    def control_received(self) -> None:
        """A control frame (ping, pong) arrived: it counts against the rate limit."""
        self._clients.charge(self, CONTROL_FRAME_COST)

    def pause_writing(self) -> None:
        """The transport cannot take more now."""
        self.client.writable = False

    def resume_writing(self) -> None:
        """The transport can take more: write what was kept."""
        self._clients.resume_writing(self)

    def closing(self) -> None:
        """The closing handshake began: write nothing more."""
        self._clients.closing(self)

    def closed(self, code: int | None = None, reason: str | None = None) -> None:
        """The connection ended, with the close code and reason the peer sent, if any."""
        self._clients.closed(self, code, reason)


class Clients:
    """Every connected client and the conversation with each.

    Args:
        config: The hub's settings.
        logger: Where connects, disconnects and internal errors are logged.
        core: The fan-out core module.
        fanout: The core's ``Fanout``.
        framer: Makes the replies.
        resumer: Answers ``since``.
        state: What clients that ask for a snapshot are shown.
        last_id: The newest message id this hub has queued for its clients.
        spawn: Runs a coroutine as a task the hub cancels when it stops.
        verify: The principal of a token a client sends in ``refresh``.
    """

    def __init__(
        self,
        config: HubConfig,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        *,
        core: ModuleType,
        fanout: Any,
        framer: Framer,
        resumer: Resumer,
        state: State,
        last_id: Callable[[], str],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        verify: Callable[[str], Coroutine[Any, Any, Principal]],
    ) -> None:
        self.config = config
        self.logger = logger
        self.core = core
        self.fanout = fanout
        self.framer = framer
        self.resumer = resumer
        self.state = state
        self.last_id = last_id
        self.spawn = spawn
        self.verify = verify
        self.sessions: dict[str, ClientSession] = {}
        # What clients cause is logged within a budget, so that they cannot flood the log.
        self.client_log = RateLimitedLog(logger)
        self.connection_log = RateLimitedLog(logger, lines=100)
        self.slow = SlowConsumers(config, self.client_log, self.sessions, self.close)
        self.protocol_errors = 0
        self.rate_limited = 0
        self.proxies = proxy_networks(config.trusted_proxies)
        # Connected clients by the address they connect from.
        self.per_address: dict[str, int] = {}
        self.compressed = 0  # connected clients sent the shared compressed frames
        self._all_closed: asyncio.Event | None = None

    # Joining and leaving

    def open(self, transport: ClientTransport, admission: Admission) -> ClientSession:
        """Add a client, greet it, replay what it missed (``?since=``) or show it the
        current state (``?snapshot=1``), and report bad input.

        One synchronous step: the greeting and the replay or snapshot are queued before any
        later publish can reach the client, so there is neither gap nor duplicate.
        """
        request = admission.request
        client_id = secrets.token_hex(8)
        topics, topics_error = self._initial_topics(request)
        topics, forbidden_error = _allowed(admission.principal, topics)
        since, since_error = _initial_since(request)
        snapshot, snapshot_error = _initial_snapshot(request)
        errors = [
            error
            for error in (topics_error, forbidden_error, since_error, snapshot_error)
            if error is not None
        ]
        kind = int(transport.frame_kind)
        if kind == self.core.DEFLATE_FRAMES and self.fanout.deflate is None:
            kind = self.core.WEBSOCKET_FRAMES  # plain frames are valid on every connection
        client = self.core.Client(client_id, transport.write, kind)
        session = ClientSession(self, client, transport, admission, self.last_id())
        self.sessions[client_id] = session
        self.per_address[session.address] = self.per_address.get(session.address, 0) + 1
        if client.kind == self.core.DEFLATE_FRAMES:
            self.compressed += 1
        greeting: dict[str, Any] = {
            "client_id": client_id,
            "status": "connected",
            "topics": sorted(set(topics)),
        }
        replay = self.resumer.local(since, topics) if since is not None else None
        if since is not None and replay is not None and self.resumer.needs_store(replay):
            # Neither in the core nor greeted yet: nothing can overtake the replay.
            self._read_stored(
                session,
                PendingReplay(
                    since=since,
                    until=self.last_id(),
                    topics=frozenset(topics),
                    live_topics=None,
                    new_topics=tuple(topics),
                    delivered_after=None,
                    answer=greeting,
                    greeting=True,
                    errors=errors,
                    snapshot=snapshot,
                ),
            )
        else:
            self.fanout.add_client(client)
            self.fanout.subscribe(client, topics)
            messages: list[Any] = []
            if replay is not None:
                answer_recovery(greeting, replay.recovered, replay.reason)
                messages = replay.frames
            if snapshot:
                messages = self._snapshot(greeting, replay, topics)
            self.send(session, MessageType.CONNECTION, greeting)
            # Complaints about the URL come right after the greeting, as without a replay.
            for error in errors:
                self.send_error(session, error)
            self._replay(session, messages)
        self._watch_expiry(session)
        if self.config.log_connection_events:
            self.connection_log.info(
                "client %s connected from %s (%s)",
                session.name,
                session.remote_addr,
                count_of(len(self.sessions), "client"),
            )
        return session

    def address_of(self, request: HandshakeRequest) -> str:
        """The address a handshake comes from, through trusted proxies."""
        return client_address(request, self.proxies)

    def connections_from(self, request: HandshakeRequest) -> int:
        """How many clients are connected from the address of ``request``."""
        return self.per_address.get(self.address_of(request), 0)

    def closing(self, session: ClientSession) -> None:
        """The session's transport began closing: nothing more is written to it."""
        self.fanout.close_client(session.client)
        self.slow.unblocked(session.client_id)

    def closed(self, session: ClientSession, code: int | None, reason: str | None) -> None:
        """Forget a client; a second call does nothing."""
        client = session.client
        if self.sessions.pop(client.client_id, None) is None:
            return
        left = self.per_address.pop(session.address, 1) - 1
        if left:
            self.per_address[session.address] = left
        if client.kind == self.core.DEFLATE_FRAMES:
            self.compressed -= 1
        self.resumer.pending.pop(client.client_id, None)
        self.fanout.remove_client(client)
        self.slow.unblocked(client.client_id)
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        if self.config.log_connection_events:
            self.connection_log.info(
                "client %s disconnected (code %s%s; %s)",
                session.name,
                code if code is not None else "none",
                f" {reason}" if reason else "",
                count_of(len(self.sessions), "client"),
            )
        if not self.sessions and self._all_closed is not None:
            self._all_closed.set()

    def close(self, session: ClientSession, code: int, reason: str) -> None:
        """Close a client: nothing more is queued for it, its transport closes the socket."""
        self.fanout.close_client(session.client)
        session.transport.close(code, reason)

    async def close_all(self, code: int, reason: str, timeout: float) -> None:
        """Close every client; abort the transports of those not gone within ``timeout``."""
        sessions = list(self.sessions.values())
        for session in sessions:
            self.close(session, code, reason)
        if self.sessions:
            self._all_closed = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                for session in list(self.sessions.values()):
                    session.transport.abort()
            finally:
                self._all_closed = None
        for session in list(self.sessions.values()):  # transports that never reported
            self.closed(session, None, None)

    def resume_writing(self, session: ClientSession) -> None:
        client = session.client
        client.writable = True
        if client.blocked:
            self.slow.unblocked(client.client_id)
            self.fanout.unblock(client)

    # Messages from clients

    def received(self, session: ClientSession, message: str | bytes) -> None:
        """Act on one client message; bad input is answered with an ``error`` envelope.

        A failure inside the hub is logged; ``disconnect_on_error`` decides whether it
        closes the client (1011) or is answered with a 500 error.
        """
        paid = self.charge(session, MESSAGE_COST)
        if session.pending is not None:
            # Answered after the resume being read, in the order the client sent them (None:
            # refused over the rate limit); the rate limit bounds how many wait here.
            session.pending.inbox.append(message if paid else None)
            return
        if session.refreshing is not None:  # the same, behind a refresh being verified
            session.refreshing.append(message if paid else None)
            return
        if paid:
            self._act(session, message)
        else:
            self.send_error(session, self._rate_limited())

    def _act(self, session: ClientSession, message: str | bytes) -> None:
        """Act on a message the client has paid for."""
        try:
            self._handle(session, message)
        except Exception:
            self.client_log.exception("error handling a message from client %s", session.client_id)
            if self.config.disconnect_on_error:
                self.close(session, INTERNAL_ERROR, "internal error")
            else:
                self.send(
                    session, MessageType.ERROR, error={"code": 500, "message": "internal error"}
                )

    def charge(self, session: ClientSession, cost: float) -> bool:
        """Spend ``cost`` of the client's rate limit: False when it cannot pay. A client
        refused as many times in a row as its burst is closed with 1008."""
        limit = session.limit
        if limit.take(cost, time.monotonic()):
            return True
        self.rate_limited += 1
        if limit.exhausted and session.client_id in self.sessions:
            self.client_log.warning(
                "closing client %s: it kept sending past its rate limit", session.client_id
            )
            self.close(session, POLICY_VIOLATION, "rate limit exceeded")
        return False

    def _rate_limited(self) -> ProtocolError:
        config = self.config
        return ProtocolError(
            f"rate limited: at most {config.client_message_rate:g} messages per second, "
            f"bursts of {config.client_message_burst}",
            {"rate": config.client_message_rate, "burst": config.client_message_burst},
            code=RATE_LIMITED,
        )

    def _handle(self, session: ClientSession, message: str | bytes) -> None:
        try:
            request = parse_client_message(message)
            if request.type is MessageType.SUBSCRIBE:
                self._subscribe(session, request.topics, request.since, request.snapshot)
            elif request.type is MessageType.UNSUBSCRIBE:
                self._unsubscribe(session, request.topics)
            elif request.type is MessageType.PING:
                session.last_ping = time.time()
                self.send(session, MessageType.PONG)
            elif request.type is MessageType.REFRESH:
                assert request.token is not None
                session.refreshing = []
                self.spawn(self._refresh(session, request.token))
            else:
                session.last_ping = time.time()
        except ProtocolError as exc:
            self.send_error(session, exc)

    def _subscribe(
        self,
        session: ClientSession,
        topics: tuple[str, ...],
        since: str | None,
        snapshot: bool = False,
    ) -> None:
        """Subscribe, answer and, with ``since``, replay what the client missed, or with
        ``snapshot`` (or a ``since`` that cannot be recovered, with both) show it the state of
        ``topics``: in one synchronous step, so later publishes queue behind the replay.

        Topics the client may not see are refused with one ``error`` 403 naming them; the
        rest of the request is applied."""
        client = session.client
        topics, forbidden = _allowed(session.principal, topics)
        if forbidden is not None:
            self.send_error(session, forbidden)
        new = [topic for topic in topics if topic not in client.topics]
        self._check_subscription_limit(len(client.topics), len(new))
        held = frozenset(client.topics)
        resuming = since is not None or snapshot
        if resuming and not self.charge(session, RESUME_COST - MESSAGE_COST):
            raise self._rate_limited()
        if not resuming:
            self.fanout.subscribe(client, new)
            self.send(session, MessageType.SUBSCRIBED, {"topics": sorted(client.topics)})
            return
        # What this connection already received live (published after it joined, to all or
        # to a topic it held) is left out of the replay and of the snapshot.
        every_topic = held.union(new)
        answer: dict[str, Any] = {}
        if since is None:
            self.fanout.subscribe(client, new)
            answer["topics"] = sorted(client.topics)
            # The state of what the subscribe adds: what matched a topic the client held
            # reached it live or in its own snapshot, so "0-0" leaves all of that out.
            messages = self._snapshot(answer, None, topics, delivered_after="0-0", delivered=held)
            self.send(session, MessageType.SUBSCRIBED, answer)
            self._replay(session, messages)
            return
        replay = self.resumer.local(
            since, every_topic, delivered_after=session.joined_after, delivered_topics=held
        )
        if self.resumer.needs_store(replay):
            self._read_stored(
                session,
                PendingReplay(
                    since=since,
                    until=self.last_id(),
                    topics=every_topic,
                    live_topics=held,
                    new_topics=tuple(new),
                    delivered_after=session.joined_after,
                    answer=answer,
                    greeting=False,
                    errors=[],
                    snapshot=snapshot,
                ),
            )
            return
        self.fanout.subscribe(client, new)
        answer["topics"] = sorted(client.topics)
        answer_recovery(answer, replay.recovered, replay.reason)
        messages = replay.frames
        if snapshot:
            messages = self._snapshot(
                answer, replay, every_topic, delivered_after=session.joined_after, delivered=held
            )
        self.send(session, MessageType.SUBSCRIBED, answer)
        self._replay(session, messages)

    def _unsubscribe(self, session: ClientSession, topics: tuple[str, ...]) -> None:
        client = session.client
        self.fanout.unsubscribe(client, topics)
        self.send(session, MessageType.UNSUBSCRIBED, {"topics": sorted(client.topics)})

    def _check_subscription_limit(self, current: int, adding: int) -> None:
        limit = self.config.max_subscriptions
        if current + adding > limit:
            raise ProtocolError(
                f"too many subscriptions: at most {limit} topics per client",
                {"limit": limit, "subscribed": current, "requested": adding},
            )

    def _initial_topics(
        self, request: HandshakeRequest
    ) -> tuple[Sequence[str], ProtocolError | None]:
        """The URL's ``?topics=``, or ``default_topics`` when the URL names none.

        Invalid ``?topics=`` start the client with no subscriptions and an error: falling back
        to the defaults (``"*"``) would flood a client that asked for a few topics.
        """
        if "topics" not in request.query:
            return self.config.default_topics, None
        names = [name.strip() for value in request.query["topics"] for name in value.split(",")]
        try:
            topics = parse_topics([name for name in names if name])
            self._check_subscription_limit(0, len(topics))
        except ProtocolError as exc:
            exc.message = f"?topics= rejected, subscribed to nothing: {exc.message}"
            return (), exc
        return topics, None

    # Replies

    def send(
        self, session: ClientSession, message_type: str, data: Any = None, **extra: Any
    ) -> None:
        """Queue a direct reply for one client, behind what it already has."""
        message = self.framer.reply(message_type, data, client_id=session.client_id, **extra)
        self.fanout.send(session.client, message)

    def send_error(self, session: ClientSession, error: ProtocolError) -> None:
        """Answer bad input with an ``error`` envelope (counted in ``protocol_errors``)."""
        self.protocol_errors += 1
        answer = error.to_error()
        try:
            self.send(session, MessageType.ERROR, error=answer)
        except TypeError:  # details that cannot be encoded: the error goes without them
            answer.pop("details", None)
            self.send(session, MessageType.ERROR, error=answer)

    def _snapshot(
        self,
        answer: dict[str, Any],
        replay: Replay | None,
        topics: Collection[str],
        *,
        delivered_after: str | None = None,
        delivered: Collection[str] = (),
        until: str | None = None,
    ) -> list[Any]:
        """What a client that asked for a snapshot gets, said in its ``answer``: the replay
        when its resume recovered everything, else the retained state of ``topics``."""
        if replay is not None and replay.recovered:
            answer["snapshot"] = False
            return replay.frames
        found = self.state.snapshot(
            topics,
            delivered_after=delivered_after,
            delivered_topics=delivered,
            until=until,
            limit=self.config.client_buffer_size,
        )
        answer["snapshot"] = True
        answer["snapshot_messages"] = len(found.items)
        if found.omitted:
            answer["snapshot_omitted"] = found.omitted
        return found.items

    def _replay(self, session: ClientSession, messages: list[Any]) -> None:
        """Queue recorded messages for one client, in order, behind what it already has."""
        send = self.fanout.send
        client = session.client
        for message in messages:
            if not send(client, message):
                break  # the client overflowed (policy "disconnect") or left

    # Resumes read from the backplane

    def _read_stored(self, session: ClientSession, pending: PendingReplay) -> None:
        session.pending = pending
        self.resumer.pending[session.client_id] = pending
        self.spawn(self._finish_stored(session, pending))

    async def _finish_stored(self, session: ClientSession, pending: PendingReplay) -> None:
        try:
            stored = await self.resumer.read_stored(pending)
        finally:
            self.resumer.pending.pop(session.client_id, None)
        if self.sessions.get(session.client_id) is not session:
            return
        if pending.overflowed:
            # A replay without what was held would have a gap: the client resumes again.
            limit = self.config.client_buffer_size
            why = f"more than {limit} messages arrived while its replay was read"
            self.slow.disconnect(session.client_id, why)
            return
        self._send_stored(session, pending, stored)

    def _send_stored(
        self, session: ClientSession, pending: PendingReplay, stored: StoredEntries
    ) -> None:
        """Answer a resume read from the backplane: the replay, then what was held meanwhile."""
        client = session.client
        session.pending = None
        if pending.greeting:
            self.fanout.add_client(client)
            session.joined_after = self.last_id()
        self.fanout.subscribe(client, pending.new_topics)
        answer = pending.answer
        answer_recovery(answer, stored.recovered, stored.reason)
        answer["topics"] = sorted(client.topics)
        messages = self.resumer.stored_messages(pending, stored)
        if pending.snapshot:
            replay = Replay(True, None, messages) if stored.recovered else None
            # The state as of the resume's start; what was held since follows it.
            messages = self._snapshot(
                answer,
                replay,
                pending.topics,
                delivered_after=pending.delivered_after,
                delivered=pending.live_topics or (),
                until=pending.until,
            ) + ([] if stored.recovered else messages)
        self.send(
            session,
            MessageType.CONNECTION if pending.greeting else MessageType.SUBSCRIBED,
            answer,
        )
        for error in pending.errors:
            self.send_error(session, error)
        self._replay(session, messages)
        self._act_on_waiting(session, pending.inbox)

    def _act_on_waiting(self, session: ClientSession, inbox: list[str | bytes | None]) -> None:
        """Messages the client sent while a resume was read or a refresh verified, in
        order; one of them may begin another resume or refresh, behind which the rest wait."""
        for waiting in inbox:
            if session.pending is not None:
                session.pending.inbox.append(waiting)
            elif session.refreshing is not None:
                session.refreshing.append(waiting)
            elif waiting is None:
                self.send_error(session, self._rate_limited())
            else:
                self._act(session, waiting)

    # Tokens: expiry and refresh

    def _watch_expiry(self, session: ClientSession) -> None:
        """Tell the client when its token expires (``token_expired``)."""
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        expires_at = session.principal.expires_at
        if expires_at is not None:
            delay = max(0.0, expires_at - time.time())
            loop = asyncio.get_running_loop()
            session.expiry = loop.call_later(delay, self._token_expired, session)

    def _token_expired(self, session: ClientSession) -> None:
        """The token expired: the client has ``auth_expiry_grace`` to send a fresh one."""
        grace = self.config.auth_expiry_grace
        expires_at = session.principal.expires_at
        assert expires_at is not None
        self.send(
            session,
            MessageType.TOKEN_EXPIRED,
            {"expired_at": _timestamp(expires_at), "grace": grace},
        )
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(grace, self._expiry_over, session)

    def _expiry_over(self, session: ClientSession) -> None:
        session.expiry = None
        if self.sessions.get(session.client_id) is session:
            self.close(session, TOKEN_EXPIRED, "token expired")

    async def _refresh(self, session: ClientSession, token: str) -> None:
        """Verify a ``refresh``'s token (a key set may be fetched), then apply it; the
        client's later messages wait in ``refreshing`` meanwhile."""
        try:
            try:
                principal: Principal | None = await self.verify(token)
            except TokenRefused as exc:
                principal = None
                refusal = exc
            except Exception:  # a bug in verifying: the client still gets an answer
                self.client_log.exception("verifying a refresh failed")
                principal = None
                refusal = AuthUnavailable("error", "the token cannot be verified now")
        finally:
            waiting, session.refreshing = session.refreshing or [], None
        if self.sessions.get(session.client_id) is not session:
            return
        if principal is None:
            code = _UNAVAILABLE if isinstance(refusal, AuthUnavailable) else _UNAUTHORIZED
            if refusal.reason == "unsupported":
                code = 400
            self.send_error(
                session,
                ProtocolError(
                    f"refresh refused: {refusal.message}", {"reason": refusal.reason}, code
                ),
            )
        elif session.identity is not None and principal.identity != session.identity:
            self.send_error(
                session,
                ProtocolError(
                    "refresh refused: the token names another identity (sub)",
                    {"reason": "identity"},
                    code=_FORBIDDEN,
                ),
            )
        else:
            self._apply_principal(session, principal)
        self._act_on_waiting(session, waiting)

    def _apply_principal(self, session: ClientSession, principal: Principal) -> None:
        """Take a refreshed token: new grants (topics they no longer allow are left), and
        a new expiry, which ends a grace period under way."""
        session.principal = principal
        client = session.client
        dropped = principal.grants.forbidden(sorted(client.topics))
        if dropped:
            self.fanout.unsubscribe(client, dropped)
        self._watch_expiry(session)
        self.send(
            session,
            MessageType.REFRESHED,
            {
                "identity": principal.identity,
                "expires_at": _timestamp(principal.expires_at),
                "topics": sorted(client.topics),
                "dropped": dropped,
            },
        )

    # Introspection

    def describe(self, session: ClientSession) -> dict[str, Any]:
        """One client as ``client_info()`` shows it."""
        client = session.client
        return {
            "id": client.client_id,
            "identity": session.principal.identity,
            "token_expires_at": _timestamp(session.principal.expires_at),
            "remote_addr": session.remote_addr,
            "user_agent": session.user_agent,
            "connected_at": _timestamp(session.connected_at),
            "last_ping": _timestamp(session.last_ping),
            "subscriptions": sorted(client.topics),
            "messages_sent": client.messages_sent,
            "messages_dropped": client.messages_dropped,
            "conflated": client.conflated,
            "compression": "deflate" if client.kind == self.core.DEFLATE_FRAMES else None,
            "buffered_bytes": client.buffered_bytes + session.transport.buffered_bytes(),
        }


def _timestamp(seconds: float | None) -> str | None:
    """Unix seconds as the envelope writes times (RFC 3339, UTC); None stays None."""
    return None if seconds is None else rfc3339(int(seconds * 1e9))


def _allowed(
    principal: Principal, topics: Sequence[str]
) -> tuple[tuple[str, ...], ProtocolError | None]:
    """The ``topics`` the principal may subscribe to, and an error 403 naming the rest."""
    grants = principal.grants
    forbidden = grants.forbidden(topics)
    if not forbidden:
        return tuple(topics), None
    named = ", ".join(repr(topic[:64]) for topic in forbidden[:10])
    more = f" and {len(forbidden) - 10} more" if len(forbidden) > 10 else ""
    error = ProtocolError(
        f"not allowed to subscribe to {named}{more}; the other topics were applied",
        {"forbidden": forbidden, "allowed": list(grants.patterns)},
        code=_FORBIDDEN,
    )
    return tuple(topic for topic in topics if grants.allows(topic)), error


def _initial_snapshot(request: HandshakeRequest) -> tuple[bool, ProtocolError | None]:
    """The URL's ``?snapshot=``: ``1`` or ``true`` asks for one; anything but ``0`` or
    ``false`` gets an error and no snapshot."""
    values = request.query.get("snapshot")
    if not values:
        return False, None
    value = values[-1].strip().lower()
    if value in ("1", "true"):
        return True, None
    if value in ("0", "false", ""):
        return False, None
    return False, ProtocolError(
        "?snapshot= ignored, no snapshot sent: it must be 1 or 0", {"snapshot": values[-1]}
    )


def _initial_since(request: HandshakeRequest) -> tuple[str | None, ProtocolError | None]:
    """The URL's ``?since=`` id, else the ``Last-Event-ID`` header (what a browser's
    ``EventSource`` sends when it reconnects); a malformed one resumes nothing and gets an
    error."""
    values = request.query.get("since")
    where = "?since="
    if not values:
        header = request.headers.get("last-event-id")
        if not header:
            return None, None
        values, where = [header.strip()], "Last-Event-ID"
    try:
        parse_message_id(values[-1])
    except ProtocolError as exc:
        exc.message = f"{where} ignored, nothing replayed: {exc.message}"
        return None, exc
    return values[-1], None
