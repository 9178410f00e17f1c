"""``python -m wshub`` (and the ``wshub`` command): ``serve`` runs a standalone hub,
``publish`` sends it a message through its internal API.

``serve --workers N`` runs N hub processes on the same two ports: the parent starts them,
forwards SIGINT and SIGTERM, and ends when they have; the kernel spreads connections over
them (``SO_REUSEPORT``) and Redis joins them into one hub (``redis_url``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from typing import Any, NamedTuple

from ._version import __version__
from .api import NOTIFY_KINDS, start_api
from .auth import ASYMMETRIC_ALGORITHMS, Grants, mint_token, parse_duration
from .config import HubConfig
from .hub import Hub, Published
from .logs import configure_logging, count_of
from .publisher import UNKNOWN, Publisher, PublishError
from .settings import (
    HUB_FIELDS,
    SERVER_FIELDS,
    ServerSettings,
    SettingsError,
    is_loopback,
    load_settings,
    setting_kinds,
)
from .transports.lean import serve

__all__ = ["Listening", "main", "run_server", "startup_warnings"]

logger = logging.getLogger("wshub")

METAVARS = {"int": "N", "float": "SECONDS", "str": "TEXT", "list": "A,B,..."}

HELP = {
    "host": "interface of the public WebSocket port",
    "port": "public WebSocket port (0 picks a free one)",
    "path": "the WebSocket endpoint",
    "events_path": "the Server-Sent Events stream of the same messages (empty: none)",
    "api_host": "interface of the internal HTTP API (keep it private)",
    "api_port": "internal HTTP API port (0 picks a free one)",
    "certfile": "TLS certificate (PEM) for wss://, with --keyfile",
    "keyfile": "TLS private key (PEM)",
    "publish_token": (
        "bearer token the internal API requires (visible to other users here: prefer "
        "--publish-token-file or WSHUB_PUBLISH_TOKEN)"
    ),
    "publish_token_file": "file holding the publish token",
    "auth_secret_file": "file holding the HS256 secret of subscriber tokens",
    "api_allowed_origins": "browser origins whose pages may POST to the internal API",
    "log_format": "text or json",
    "log_level": "debug, info, warning or error",
    "workers": "processes sharing both ports (SO_REUSEPORT, Linux); more than 1 needs --redis-url",
}


def _hub_field_help() -> dict[str, str]:
    """One line per HubConfig field, from its docstring's Attributes section."""
    lines = (HubConfig.__doc__ or "").splitlines()
    helps: dict[str, str] = {}
    current = None
    for line in lines:
        stripped = line.strip()
        name, _, rest = stripped.partition(":")
        if name in HUB_FIELDS and rest:
            current = name
            helps[name] = rest.strip()
        elif current and stripped and not stripped.endswith(":"):
            helps[current] += " " + stripped
        else:
            current = None
    return {name: _plain(text) for name, text in helps.items()}


def _plain(text: str) -> str:
    """A docstring's line as a terminal shows it: no reST roles or literals, and what is
    None in Python is unset on the command line."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text).replace("``", "")
    return re.sub(r"\bNone\b", "unset", text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wshub",
        description="A WebSocket fan-out hub for benchmark events.",
    )
    parser.add_argument("--version", action="version", version=f"wshub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "serve",
        help="run a standalone hub",
        description=(
            "Run a hub: WebSocket clients on --port, the internal HTTP API on --api-port. "
            "Every setting may also come from a TOML file (--config, keys named like the "
            "settings: max_clients = 10000) or an environment variable (WSHUB_MAX_CLIENTS); "
            "flags win over the environment, which wins over the file. Lists are "
            "comma-separated in flags and variables."
        ),
    )
    _add_publish_command(commands)
    _add_token_command(commands)
    run.add_argument("--config", type=Path, help="TOML file with settings")
    kinds = setting_kinds()
    defaults = ServerSettings()
    helps = {**HELP, **_hub_field_help()}
    for name in (*SERVER_FIELDS, *HUB_FIELDS):
        owner: Any = defaults if name in SERVER_FIELDS else defaults.hub
        default = getattr(owner, name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        shown = "unset" if shown is None else shown
        flag = "--" + name.replace("_", "-")
        text = f"{helps.get(name, '')} (default: {shown}; env WSHUB_{name.upper()})"
        if kinds[name] == "bool":
            run.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            metavar = METAVARS[kinds[name].rstrip("?")]
            run.add_argument(flag, dest=name, default=None, metavar=metavar, help=text)
    return parser


def _add_publish_command(commands: Any) -> None:
    publish = commands.add_parser(
        "publish",
        help="publish one message through a hub's internal API",
        description="POST one message to a running hub's /api/publish, or one of the "
        "runner's events to /api/notify/<kind>, where it is checked as the runner's are.",
    )
    publish.add_argument(
        "--url",
        default=os.environ.get("WSHUB_API_URL", "http://127.0.0.1:8081"),
        help="the internal API (default: http://127.0.0.1:8081; env WSHUB_API_URL)",
    )
    what = publish.add_mutually_exclusive_group(required=True)
    what.add_argument("--type", dest="message_type", help="message type")
    what.add_argument(
        "--notify",
        choices=NOTIFY_KINDS,
        metavar="KIND",
        help=f"one of the runner's events ({', '.join(NOTIFY_KINDS)}); --data is its body",
    )
    publish.add_argument(
        "--data",
        help="the data as JSON, or @FILE to read it from a file (with --notify: the body, "
        "an object)",
    )
    publish.add_argument("--topics", help="comma-separated topics (default: every client)")
    publish.add_argument(
        "--key",
        help="the message's conflation key, e.g. run:42: a newer message with the same key "
        "supersedes it for a client that fell behind (default: none, an event never dropped)",
    )
    publish.add_argument(
        "--token",
        default=os.environ.get("WSHUB_PUBLISH_TOKEN"),
        help="the hub's publish token (env WSHUB_PUBLISH_TOKEN)",
    )
    publish.add_argument(
        "--idempotency-key",
        help="publishes with the same key within the hub's idempotency window are delivered "
        "once (default: a fresh key, which makes the retries of this command safe)",
    )
    publish.add_argument(
        "--retry-for",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep retrying while the hub answers 503 or cannot be reached (default: 0, try once)",
    )


def _add_token_command(commands: Any) -> None:
    token = commands.add_parser(
        "token",
        help="mint a subscriber token",
        description="Print a subscriber token (a JWT) for one client: who it is (--sub), "
        "the topics it may subscribe to (--topics) and how long it is valid (--ttl). HS256 "
        "with the hub's secret, or RS256/ES256 with a private key whose public key the hub "
        "verifies with.",
    )
    token.add_argument("--sub", help="the client's identity, shown in client_info and logs")
    token.add_argument(
        "--topics",
        required=True,
        help="comma-separated topic patterns it may subscribe to: exact topics, prefixes "
        "ending in * (test:eth_*), or * for every topic",
    )
    token.add_argument("--ttl", default="1h", help="validity: 90, 30s, 15m, 1h, 7d (default: 1h)")
    token.add_argument(
        "--auth-secret-file",
        type=Path,
        help="file holding the HS256 secret (default: env WSHUB_AUTH_SECRET)",
    )
    token.add_argument(
        "--private-key", type=Path, help="PEM private key, to sign with RS256 or ES256 instead"
    )
    token.add_argument(
        "--algorithm",
        choices=ASYMMETRIC_ALGORITHMS,
        help="with --private-key: RS256 (an RSA key, the default) or ES256 (an EC P-256 key)",
    )
    token.add_argument("--audience", help="the token's aud, when the hub checks one")
    token.add_argument("--issuer", help="the token's iss, when the hub checks one")


def _token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        parser.error(f"--ttl: {exc}")
    topics = [topic.strip() for topic in args.topics.split(",") if topic.strip()]
    try:
        Grants.of(topics)
    except ValueError as exc:
        parser.error(f"--topics: {exc}")
    if args.algorithm is not None and args.private_key is None:
        parser.error("--algorithm: RS256 and ES256 sign with --private-key")
    if args.private_key is not None:
        if args.auth_secret_file is not None:
            parser.error("--private-key and --auth-secret-file: give one key")
        flag, algorithm = "--private-key", args.algorithm or ASYMMETRIC_ALGORITHMS[0]
        key = _read_key(parser, args.private_key, flag)
    elif args.auth_secret_file is not None:
        flag, algorithm = "--auth-secret-file", "HS256"
        key = _read_key(parser, args.auth_secret_file, flag)
    elif os.environ.get("WSHUB_AUTH_SECRET"):
        key, flag, algorithm = os.environ["WSHUB_AUTH_SECRET"], "WSHUB_AUTH_SECRET", "HS256"
    else:
        parser.error("no key: give --auth-secret-file, WSHUB_AUTH_SECRET or --private-key")
    try:
        token = mint_token(
            key,
            sub=args.sub,
            topics=topics,
            ttl=ttl,
            algorithm=algorithm,
            audience=args.audience,
            issuer=args.issuer,
        )
    except ValueError as exc:
        parser.error(f"{flag}: {exc}")
    print(token)
    return 0


def _read_key(parser: argparse.ArgumentParser, path: Path, flag: str) -> str:
    """The text of the key file ``flag`` names (surrounding whitespace removed)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"{flag}: cannot read {path}: {exc}")
    if not text:
        parser.error(f"{flag}: {path} is empty")
    return text


def _publish(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    text = args.data
    try:
        if text is not None and text.startswith("@"):
            text = Path(text[1:]).read_text()
        data = json.loads(text) if text is not None else None
    except (OSError, ValueError) as exc:
        parser.error(f"--data: not JSON, or not readable: {exc}")
    topics = [t.strip() for t in args.topics.split(",") if t.strip()] if args.topics else None
    try:
        publisher = Publisher(args.url, token=args.token, retry_for=max(args.retry_for, 0.0))
        if args.notify is not None:
            if not isinstance(data, dict):
                parser.error(f"--data: the body of a {args.notify} event must be a JSON object")
            if topics is not None:
                parser.error("--topics: an event goes to the topics of its kind, run and test")
            if args.key is not None:
                parser.error("--key: an event of a run carries the run's key already")
            published = publisher.notify(args.notify, data, idempotency_key=args.idempotency_key)
        else:
            published = publisher.publish(
                args.message_type, data, topics, idempotency_key=args.idempotency_key, key=args.key
            )
    except PublishError as exc:
        unknown = (
            " (outcome unknown: it may have been delivered)" if exc.outcome == UNKNOWN else ""
        )
        print(f"wshub publish: {exc}{unknown}", file=sys.stderr)
        return 1
    print(_published_line(published, args.idempotency_key))
    return 0


def _published_line(published: Published, key: str | None) -> str:
    """What ``wshub publish`` says it did: a duplicate is not "0 clients"."""
    if published.duplicate:
        if key is not None:
            return (
                f"not sent again: idempotency key {key!r} was already published "
                f"(message {published.id})"
            )
        return f"delivered by an earlier attempt whose answer was lost (message {published.id})"
    if published.recipients is None:
        return (
            f"published (message {published.id}); the hub had not read it back from Redis "
            "in time to count its clients"
        )
    return f"queued for {count_of(published.recipients, 'client')} (message {published.id})"


def _ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    if settings.certfile is None or settings.keyfile is None:
        return None
    for flag, path in (("--certfile", settings.certfile), ("--keyfile", settings.keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise SettingsError(f"{flag} {path}: cannot read it: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"--certfile {settings.certfile} / --keyfile {settings.keyfile}: not a PEM "
            f"certificate and its private key: {exc}"
        ) from None
    return context


def _cannot_listen(flag: str, host: str, port: int, exc: OSError) -> SettingsError:
    """What to say when a port cannot be bound, naming the flags that choose it."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return SettingsError(
            f"{flag} {port}: {where} is in use by another program; choose another port with "
            f"{flag} (0 picks a free one)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        host_flag = "--api-host" if flag == "--api-port" else "--host"
        return SettingsError(f"{host_flag} {host}: no interface of this machine has that address")
    reason = exc.strerror or str(exc)
    return SettingsError(f"{flag} {port}: cannot listen on {where}: {reason}")


class Listening(NamedTuple):
    """Where a started server listens.

    Attributes:
        url: The WebSocket endpoint, ``ws://host:port/path`` (``wss://`` with TLS).
        dashboard: The dashboard's page on the same port.
        api: The internal API, ``http://host:port``.
        implementation: The fan-out core, ``"cython"`` or ``"python"``.
    """

    url: str
    dashboard: str
    api: str
    implementation: str


def _log_listening(listening: Listening, workers: int = 1) -> None:
    # Scripts and tests read the ports from these lines (tests/processes.py): keep them so.
    shared = f" in {workers} workers" if workers > 1 else ""
    logger.info(
        "listening on %s with the %s core%s", listening.url, listening.implementation, shared
    )
    logger.info("dashboard on %s", listening.dashboard)
    logger.info("internal API on %s", listening.api)


async def run_server(
    settings: ServerSettings,
    stop: asyncio.Event | None = None,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[Listening], None] | None = None,
) -> None:
    """Serve until ``stop`` is set, or SIGINT/SIGTERM; then shut down gracefully.

    The public port also serves the browser dashboard (``GET /``): a standalone hub is
    what an operator opens in a browser.

    Args:
        settings: What to serve, and where.
        stop: Set it to shut down; None shuts down on SIGINT and SIGTERM.
        reuse_port: Bind both ports with ``SO_REUSEPORT``, shared with other processes.
        on_ready: Called once both ports listen; None logs where they are.
    """
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    context = _ssl_context(settings)
    hub = Hub(settings.hub, logger=logger)
    options: dict[str, Any] = {"reuse_port": True} if reuse_port else {}
    async with contextlib.AsyncExitStack() as stack:
        try:
            server = await stack.enter_async_context(
                serve(
                    hub,
                    settings.host,
                    settings.port,
                    path=settings.path,
                    events_path=settings.events_path or None,
                    ssl=context,
                    dashboard=True,
                    **options,
                )
            )
        except OSError as exc:
            raise _cannot_listen("--port", settings.host, settings.port, exc) from None
        port = server.sockets[0].getsockname()[1]
        try:
            api = await start_api(
                hub,
                settings.api_host,
                settings.api_port,
                publish_token=settings.publish_token,
                allowed_origins=settings.api_allowed_origins,
                reuse_port=reuse_port,
            )
        except OSError as exc:
            raise _cannot_listen("--api-port", settings.api_host, settings.api_port, exc) from None
        scheme, web = ("wss", "https") if context else ("ws", "http")
        listening = Listening(
            f"{scheme}://{settings.host}:{port}{settings.path}",
            f"{web}://{settings.host}:{port}/",
            api.url,
            hub.implementation,
        )
        (on_ready or _log_listening)(listening)
        try:
            await stop.wait()
        finally:
            # The API first, so nothing publishes into a hub that is saying goodbye.
            await api.close()
        logger.info("shutting down: closing %s", count_of(hub.client_count, "client"))
    logger.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "publish":
        return _publish(parser, args)
    if args.command == "token":
        return _token(parser, args)
    flags = {name: getattr(args, name) for name in (*SERVER_FIELDS, *HUB_FIELDS)}
    try:
        settings = load_settings(flags, config_file=args.config)
    except SettingsError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_format, settings.log_level)
    for warning in startup_warnings(flags, settings):
        logger.warning("%s", warning)
    if settings.workers > 1:
        return _supervise(settings)
    return _serve(run_server(settings))


def startup_warnings(flags: dict[str, Any], settings: ServerSettings) -> list[str]:
    """What ``wshub serve`` warns about before it starts: secrets on the command line, and
    a public port that anyone may subscribe through."""
    warnings = [
        f"--{secret.replace('_', '-')} is on the command line, where every user of this "
        f"machine can read it (ps, /proc); use {instead}"
        for secret, instead in (
            ("publish_token", "--publish-token-file or WSHUB_PUBLISH_TOKEN"),
            ("auth_secret", "--auth-secret-file or WSHUB_AUTH_SECRET"),
        )
        if flags.get(secret) is not None
    ]
    if not settings.hub.auth_required and not is_loopback(settings.host):
        warnings.append(
            f"auth_required is off on {settings.host}: anyone who reaches the public port "
            f"may subscribe to every topic (see docs/security.md)"
        )
    return warnings


def _serve(server: Coroutine[Any, Any, None]) -> int:
    """Run ``server`` to its end; the exit code."""
    try:
        _run(server)
    except SettingsError as exc:
        print(f"wshub: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the interface does not exist, ...
        logger.error("cannot serve: %s", exc)
        return 1
    return 0


def _run(coroutine: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


# serve --workers N

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _supervise(settings: ServerSettings) -> int:
    """Run ``settings.workers`` hub processes on shared ports; the exit code."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print("wshub: error: workers above 1 need SO_REUSEPORT (Linux)", file=sys.stderr)
        return 2
    try:
        # Once here rather than once per worker: a bad certificate is one message.
        _ssl_context(settings)
    except SettingsError as exc:
        print(f"wshub: error: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as reservations:
        try:
            settings = _reserve_ports(settings, reservations)
        except OSError as exc:
            logger.error("cannot serve: %s", exc)
            return 1
        return _Supervisor(settings).run()


def _reserve_ports(settings: ServerSettings, reservations: contextlib.ExitStack) -> ServerSettings:
    """The settings with each port 0 replaced by a free port, reserved until the end.

    Workers bind their ports themselves, so with port 0 each would get a different one. The
    parent binds port 0 with ``SO_REUSEPORT`` and keeps the socket without listening on it:
    the kernel hands connections only to listening sockets, so the workers, binding the same
    port with ``SO_REUSEPORT``, get them all, and no other program can take the port in the
    meantime (only sockets of the same user with ``SO_REUSEPORT`` may share it). Handing one
    listening socket to every worker would also work, but then the workers would share one
    accept queue and bind differently with port 0 than with a given port.
    """
    ports = {}
    for name, host in (("port", settings.host), ("api_port", settings.api_host)):
        if getattr(settings, name) != 0:
            continue
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        reservation = reservations.enter_context(socket.socket(family, kind, proto))
        # The options asyncio and aiohttp set on the workers' sockets: the kernel lets
        # sockets share a port only when their options agree.
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            reservation.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        reservation.bind(address)
        ports[name] = reservation.getsockname()[1]
    return dataclasses.replace(settings, **ports)


@dataclasses.dataclass(eq=False)
class _Worker:
    number: int
    process: SpawnProcess
    # The parent's end of a pipe to the worker: the worker says where it listens through
    # it, and sees it close when the parent is gone.
    connection: Connection
    listening: Listening | None = None
    # Set before it is reaped: until then its pid cannot be another process's, so signalling
    # it is safe, and the signal handler need not reap anything itself.
    ended: bool = False


class _Supervisor:
    """Starts the workers, forwards stop signals to them and watches them end.

    A worker that ends on its own (a crash, the OOM killer, a stray signal) stops them all
    and makes the exit code non-zero: the service manager (systemd, Kubernetes) restarts the
    whole server, and clients resume on the new workers through Redis without a gap. Restarting
    one worker here would hide the failure.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.count = settings.workers
        self.workers: list[_Worker] = []
        self.stopping = False
        self.exit_code = 0

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            # Spawn, not fork: a forked worker would inherit the parent's logging handlers,
            # locks and any thread some import started, and fork under threads is unsafe. A
            # spawned worker is a fresh interpreter, as if started by hand. Multiprocessing
            # rather than a subprocess running wshub serve again: it hands the worker the
            # settings already validated here, with no second round of flags, environment
            # and file, and a pipe to report on, with no fd plumbing.
            context = multiprocessing.get_context("spawn")
            for number in range(1, self.count + 1):
                if not self.stopping:
                    self._start(context, number)
            self._watch()
        except BaseException:
            self._stop(signal.SIGTERM)
            for worker in self.workers:
                worker.process.join()
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for worker in self.workers:
                worker.connection.close()
        logger.info("stopped")
        return self.exit_code

    def _name(self, worker: _Worker) -> str:
        return f"worker {worker.number}/{self.count} (pid {worker.process.pid})"

    def _start(self, context: SpawnContext, number: int) -> None:
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_work,
            args=(self.settings, number, self.count, theirs),
            name=f"wshub worker {number}/{self.count}",
        )
        process.start()
        # Only the worker holds its end now, so ours reads end-of-file when it is gone.
        theirs.close()
        worker = _Worker(number, process, ours)
        self.workers.append(worker)
        logger.info("started %s", self._name(worker))
        if self.stopping:  # the signal came while it was starting, before it was listed
            os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]

    def _watch(self) -> None:
        """Wait until every worker has ended; log where they listen once all do."""
        running = {worker.process.sentinel: worker for worker in self.workers}
        starting = {worker.connection: worker for worker in self.workers}
        while running:
            for ready in multiprocessing.connection.wait([*running, *starting]):
                if isinstance(ready, int):
                    worker = running.pop(ready)
                    worker.ended = True
                    worker.process.join()
                    self._ended(worker)
                    continue
                assert isinstance(ready, Connection)
                worker = starting.pop(ready)
                try:
                    worker.listening = worker.connection.recv()
                except EOFError:  # it ended before listening: its sentinel says how
                    continue
                if not starting and not self.stopping:
                    assert worker.listening is not None
                    _log_listening(worker.listening, self.count)

    def _ended(self, worker: _Worker) -> None:
        code = worker.process.exitcode
        assert code is not None
        # A stop signal that arrives before a worker has set up its handlers ends it by the
        # signal's default action: that is a stop too.
        if self.stopping and code in (0, *(-signum for signum in STOP_SIGNALS)):
            return
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if self.stopping:
            logger.error("%s failed while stopping (%s)", self._name(worker), how)
        else:
            logger.error(
                "%s ended unexpectedly (%s); stopping the others", self._name(worker), how
            )
        if not self.exit_code:
            self.exit_code = code if code > 0 else 1
        self._stop(signal.SIGTERM)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            logger.info("%s: stopping the workers", signal.Signals(signum).name)
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        self.stopping = True
        for worker in self.workers:
            if not worker.ended:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signum)  # type: ignore[arg-type]


class _WorkerLabel(logging.Filter):
    """Starts each log message of a worker with ``worker <n>/<count>: ``, text or JSON."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.prefix = label + ": "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + record.getMessage()
        record.args = None
        return True


def _work(settings: ServerSettings, number: int, count: int, parent: Connection) -> None:
    """A worker process: one hub on the shared ports, until a stop signal or the parent ends."""
    configure_logging(settings.log_format, settings.log_level)
    label = f"worker {number}/{count}"
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerLabel(label))
    raise SystemExit(_serve(_work_until_stopped(settings, parent)))


async def _work_until_stopped(settings: ServerSettings, parent: Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)

    def parent_gone() -> None:
        # The parent never writes: readable means its end closed. A worker left behind by
        # a killed parent would hold the ports with nobody to stop it.
        loop.remove_reader(parent.fileno())
        logger.error("the parent process is gone; stopping")
        stop.set()

    def ready(listening: Listening) -> None:
        # Not the "listening on" line: the parent logs that once every worker listens.
        logger.info("serving %s and %s", listening.url, listening.api)
        parent.send(listening)

    loop.add_reader(parent.fileno(), parent_gone)
    try:
        await run_server(settings, stop, reuse_port=True, on_ready=ready)
    finally:
        loop.remove_reader(parent.fileno())
