"""Hub configuration: every tunable in one validated dataclass.

The defaults here are the only place the hub's defaults live.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .auth import algorithm_of, check_secret
from .compression import COMPRESSION_MODES
from .limits import proxy_networks
from .wire import MAX_TOPIC_LENGTH, topic_problem

__all__ = ["EVENT_FORMATS", "SLOW_CLIENT_POLICIES", "HubConfig"]

SLOW_CLIENT_POLICIES = ("conflate", "disconnect", "drop_oldest")
#: The shapes of the runner's events: this hub's own, or the one NethermindEth/json-bench's
#: React dashboard reads (see wshub.runner).
EVENT_FORMATS = ("wshub", "json-bench")
REDIS_URL_SCHEMES = ("redis", "rediss", "unix")


@dataclasses.dataclass(frozen=True)
class HubConfig:
    """Settings of one :class:`~wshub.Hub`, checked when the object is built.

    Durations are seconds. A bad value raises :class:`ValueError` whose message starts with
    the field's name.

    Attributes:
        max_clients: Most concurrent clients; further handshakes get HTTP 503.
        write_timeout: How long a client's transport may stay full without draining before
            the client is closed as a slow consumer, and how long ``stop()`` waits for buffered
            frames and closing handshakes.
        read_timeout: With ``enable_ping_pong`` off, the longest a client may stay silent
            before it is closed (1011).
        open_timeout: Deadline for a client's opening handshake (TLS included), from the
            TCP connection to the request answered; later, the connection is dropped.
        max_pending_handshakes: Most connections at once that have not finished their
            opening handshake (they are not clients yet, so ``max_clients`` does not count
            them); past it, new TCP connections are closed at once.
        ping_interval: Seconds between protocol pings to each client.
        pong_timeout: A client that has not answered a ping within this is closed (1011).
        max_message_size: Largest frame a client may send, in bytes; larger closes with 1009.
        max_publish_size: Largest message the hub sends, envelope included, in bytes; a
            larger publish is refused (:class:`wshub.wire.MessageTooLarge`, HTTP 413). The
            default is what websockets clients take by default (1 MiB); browsers take more.
        client_buffer_size: Most messages queued in the hub for one client.
        broadcast_buffer_size: Most messages waiting from ``publish_threadsafe`` at once.
        enable_ping_pong: Send protocol pings and enforce ``pong_timeout``.
        disconnect_on_error: When handling a client's message fails inside the hub (a bug,
            not bad input), close that client with 1011 instead of answering with a 500 error.
        log_connection_events: Log connects and disconnects at INFO.
        max_buffered_bytes: Most bytes queued in the hub for one client.
        slow_client_policy: What a client that falls behind gets. ``"conflate"``: a
            message with a ``key`` supersedes the older one with the same key still queued
            (counted as ``conflated``), so the client catches up on the latest of every key;
            when messages without a key, and one per key, fill its buffer, it is closed
            with 4008.
            ``"disconnect"`` closes it with 4008; ``"drop_oldest"`` drops its oldest
            messages and counts them.
        default_topics: Topics of a client that names none in its URL.
        max_subscriptions: Most topics one client may hold.
        allowed_origins: Browser origins allowed to connect; None allows any.
        flush_interval: 0 writes queued frames at the end of the current event-loop iteration;
            more than 0 coalesces writes for up to that many seconds.
        history_size: Most published messages kept for clients that resume with ``since``;
            0 disables the history.
        history_ttl: Seconds a published message is kept for resuming clients; 0 disables
            the history.
        snapshot_window: Most messages without a ``key`` (events) retained for clients that
            join asking for a snapshot (``?snapshot=1``); 0 retains none.
        snapshot_window_ttl: Seconds such an event stays in snapshots; 0 retains none.
        snapshot_key_ttl: Seconds the latest message of a ``key`` stays in snapshots after
            it was published, so a finished run shows its final message that long; 0 retains
            no keys.
        snapshot_max_keys: Most keys retained for snapshots; past it, the key published
            least recently is dropped.
        redis_url: ``redis://``, ``rediss://`` or ``unix://`` URL of the Redis that joins
            several hubs into one (see :mod:`wshub.backplane`); None runs this hub alone.
        redis_stream: The Redis stream key the joined hubs share; hubs on other keys of the
            same Redis form separate groups.
        idempotency_window: Seconds a publish's ``idempotency_key`` is remembered: another
            publish with the same key within it sends nothing and answers the first one's id.
        event_format: The shape of the runner's ``new_run``, ``regression_detected`` and
            ``baseline_updated`` events: ``"wshub"`` (the README's table) or
            ``"json-bench"``, what NethermindEth/json-bench's own dashboard reads (a whole
            ``HistoricRun``; ``runId``, ``metricName``, ``percentChange``, ...).
        compression: ``"deflate"`` (the default) answers a client's permessage-deflate
            offer (RFC 7692) with ``server_no_context_takeover``, so that each message is
            compressed once for every client that negotiated it (:mod:`wshub.compression`);
            ``"off"`` sends every client plain frames. The lean server and the websockets
            transport negotiate it; aiohttp's and ASGI's connections stay plain.
        compression_min_size: Messages shorter than this many bytes (the JSON envelope) go
            plain even to clients that negotiated compression: they would hardly shrink.
        socket_send_buffer: The kernel send buffer of each client's socket (``SO_SNDBUF``),
            in bytes; 0 leaves it to the kernel, which grows it up to ``net.ipv4.tcp_wmem``'s
            maximum (4 MiB by default on Linux) for a client that reads slowly.
        max_connections_per_ip: Most clients connected at once from one address; more get
            HTTP 429. 0 (the default) sets no limit: behind a proxy every client shares the
            proxy's address unless it is in ``trusted_proxies``.
        trusted_proxies: Addresses or networks (``10.0.0.0/8``) of reverse proxies whose
            ``X-Forwarded-For`` names the client; nobody else's header is believed.
        file_descriptor_reserve: File descriptors the lean server leaves free for the rest
            of the process (the internal API and its health checks, Redis, log files): a
            connection accepted with fewer free is answered 503 and closed at once, instead
            of the process running out and failing every accept.
        client_message_rate: Messages (and control frames) per second one client may send,
            on average; past it, messages are refused with an ``error`` 429 (see
            :mod:`wshub.limits`). 0 disables the limit.
        client_message_burst: How many a client may send at once above that rate; a client
            refused this many times in a row is closed with 1008.
        auth_required: Refuse a handshake without a valid subscriber token with HTTP 401
            (see :mod:`wshub.auth`). Off by default, for a hub embedded behind its own
            gate; without it, a client that brings no token may subscribe to anything, and
            one that brings a bad token is still refused.
        auth_secret: The HS256 secret subscriber tokens are signed with (at least 32 bytes).
        auth_public_key: The RS256 or ES256 public key that verifies subscriber tokens: PEM
            text, or the path of a PEM file (read once, when the config is built).
        auth_jwks_url: An ``https://`` (or ``http://``) URL of a JSON Web Key Set whose keys
            verify subscriber tokens (RS256, ES256) by their ``kid``; the set is cached and
            fetched again after five minutes, or at once for an unknown ``kid``.
        auth_audience: When set, a token's ``aud`` must name it.
        auth_issuer: When set, a token's ``iss`` must be it.
        auth_leeway: Seconds of clock difference tolerated on a token's ``exp``.
        auth_expiry_grace: Seconds a client whose token expired keeps its connection, after
            the ``token_expired`` message, to send a ``refresh`` before it is closed (4001).
        auth_timeout: The longest an ``authenticate`` hook or a JWKS fetch may take for one
            handshake; later, the client is refused (503).
    """

    max_clients: int = 100
    write_timeout: float = 10.0
    read_timeout: float = 60.0
    open_timeout: float = 10.0
    max_pending_handshakes: int = 1000
    ping_interval: float = 54.0
    pong_timeout: float = 60.0
    max_message_size: int = 524288
    max_publish_size: int = 1024 * 1024
    client_buffer_size: int = 256
    broadcast_buffer_size: int = 1000
    enable_ping_pong: bool = True
    disconnect_on_error: bool = True
    log_connection_events: bool = True
    max_buffered_bytes: int = 1024 * 1024
    slow_client_policy: str = "conflate"
    default_topics: Sequence[str] = ("*",)
    max_subscriptions: int = 100
    allowed_origins: Sequence[str] | None = None
    flush_interval: float = 0.0
    history_size: int = 1000
    history_ttl: float = 300.0
    snapshot_window: int = 100
    snapshot_window_ttl: float = 3600.0
    snapshot_key_ttl: float = 3600.0
    snapshot_max_keys: int = 10_000
    redis_url: str | None = None
    redis_stream: str = "wshub:messages"
    idempotency_window: float = 300.0
    event_format: str = "wshub"
    compression: str = "deflate"
    compression_min_size: int = 128
    socket_send_buffer: int = 0
    max_connections_per_ip: int = 0
    file_descriptor_reserve: int = 100
    trusted_proxies: Sequence[str] = ()
    # A dashboard sends a few subscribes when it opens and a ping now and then.
    client_message_rate: float = 10.0
    client_message_burst: int = 40
    auth_required: bool = False
    auth_secret: str | None = dataclasses.field(default=None, repr=False)
    auth_public_key: str | None = None
    auth_jwks_url: str | None = None
    auth_audience: str | None = None
    auth_issuer: str | None = None
    auth_leeway: float = 5.0
    auth_expiry_grace: float = 30.0
    auth_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "max_clients",
            "max_message_size",
            "max_publish_size",
            "client_buffer_size",
            "broadcast_buffer_size",
            "max_buffered_bytes",
            "max_subscriptions",
            "client_message_burst",
            "max_pending_handshakes",
            "snapshot_max_keys",
        ):
            _check_positive_int(name, getattr(self, name))
        for name in (
            "write_timeout",
            "read_timeout",
            "open_timeout",
            "ping_interval",
            "pong_timeout",
            "idempotency_window",
            "auth_expiry_grace",
            "auth_timeout",
        ):
            _check_number(name, getattr(self, name), allow_zero=False)
        _check_number("auth_leeway", self.auth_leeway, allow_zero=True)
        _check_number("flush_interval", self.flush_interval, allow_zero=True)
        _check_number("history_ttl", self.history_ttl, allow_zero=True)
        _check_number("snapshot_window_ttl", self.snapshot_window_ttl, allow_zero=True)
        _check_number("snapshot_key_ttl", self.snapshot_key_ttl, allow_zero=True)
        _check_count("snapshot_window", self.snapshot_window, "no events in snapshots")
        _check_count("socket_send_buffer", self.socket_send_buffer, "the kernel's choice")
        _check_count("compression_min_size", self.compression_min_size, "compress every message")
        if self.compression not in COMPRESSION_MODES:
            raise ValueError(
                f"compression must be one of {', '.join(COMPRESSION_MODES)}, "
                f"got {self.compression!r}"
            )
        _check_number(
            "client_message_rate",
            self.client_message_rate,
            allow_zero=True,
            unit="messages per second",
        )
        _check_count("history_size", self.history_size, "no history")
        if self.redis_url is not None and (
            not isinstance(self.redis_url, str)
            or urllib.parse.urlsplit(self.redis_url).scheme not in REDIS_URL_SCHEMES
        ):
            raise ValueError(
                f"redis_url must be a {', '.join(s + '://' for s in REDIS_URL_SCHEMES)} URL, "
                f"got {self.redis_url!r}"
            )
        if not isinstance(self.redis_stream, str) or not self.redis_stream:
            raise ValueError(f"redis_stream must be a non-empty string, got {self.redis_stream!r}")
        for name in (
            "enable_ping_pong",
            "disconnect_on_error",
            "log_connection_events",
            "auth_required",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.event_format not in EVENT_FORMATS:
            raise ValueError(
                f"event_format must be one of {', '.join(EVENT_FORMATS)}, "
                f"got {self.event_format!r}"
            )
        if self.slow_client_policy not in SLOW_CLIENT_POLICIES:
            raise ValueError(
                f"slow_client_policy must be one of {', '.join(SLOW_CLIENT_POLICIES)}, "
                f"got {self.slow_client_policy!r}"
            )
        topics = _as_string_tuple("default_topics", self.default_topics)
        for topic in topics:
            if topic_problem(topic) is not None:
                raise ValueError(
                    f"default_topics entries must be 1 to {MAX_TOPIC_LENGTH} characters, "
                    f"got {topic!r}"
                )
        if len(set(topics)) > self.max_subscriptions:
            raise ValueError(
                f"default_topics has {len(set(topics))} topics, more than max_subscriptions "
                f"({self.max_subscriptions})"
            )
        object.__setattr__(self, "default_topics", topics)
        _check_count("file_descriptor_reserve", self.file_descriptor_reserve, "none")
        _check_count("max_connections_per_ip", self.max_connections_per_ip, "no limit")
        proxies = _as_string_tuple("trusted_proxies", self.trusted_proxies)
        try:
            proxy_networks(proxies)
        except ValueError as exc:
            raise ValueError(f"trusted_proxies must be IP addresses or networks: {exc}") from None
        object.__setattr__(self, "trusted_proxies", proxies)
        if self.allowed_origins is not None:
            origins = _as_string_tuple("allowed_origins", self.allowed_origins)
            object.__setattr__(self, "allowed_origins", origins)
        self._check_auth()

    def _check_auth(self) -> None:
        """One way to verify tokens at most, each key checked now, so that a bad one stops
        the start and not the first client."""
        for name in ("auth_secret", "auth_public_key", "auth_jwks_url", "auth_audience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string")
        if self.auth_issuer is not None and not isinstance(self.auth_issuer, str):
            raise ValueError(f"auth_issuer must be a string, got {self.auth_issuer!r}")
        keys = [
            name
            for name in ("auth_secret", "auth_public_key", "auth_jwks_url")
            if getattr(self, name) is not None
        ]
        if len(keys) > 1:
            raise ValueError(
                f"{keys[0]} and {keys[1]} are both set: give one way to verify tokens"
            )
        if self.auth_secret is not None:
            check_secret("auth_secret", self.auth_secret)
        if self.auth_public_key is not None:
            pem = _read_pem(self.auth_public_key)
            try:
                algorithm_of(pem)
            except ValueError as exc:
                raise ValueError(f"auth_public_key: {exc}") from None
            object.__setattr__(self, "auth_public_key", pem)
        if self.auth_jwks_url is not None:
            scheme = urllib.parse.urlsplit(self.auth_jwks_url).scheme
            if scheme not in ("https", "http"):
                raise ValueError(
                    f"auth_jwks_url must be an https:// URL, got {self.auth_jwks_url!r}"
                )


def _read_pem(value: str) -> str:
    """A PEM key given as text, or read from the file it names."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    try:
        return Path(value).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"auth_public_key cannot be read: {value}: {exc}") from None


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_count(name: str, value: Any, zero_means: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{name} must be zero ({zero_means}) or a positive integer, got {value!r}"
        )


def _check_number(name: str, value: Any, *, allow_zero: bool, unit: str = "seconds") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of {unit}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise ValueError(f"{name} must be {bound} {unit}, got {value!r}")


def _as_string_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    if not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)
