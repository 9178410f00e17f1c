"""``python -m wshub`` (and the ``wshub`` command): ``serve`` runs a standalone hub,
``publish`` sends it a message through its internal API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .api import start_api
from .config import HubConfig
from .connection import serve
from .hub import Hub
from .logs import configure_logging
from .publisher import Publisher, PublishError
from .settings import (
    HUB_FIELDS,
    SERVER_FIELDS,
    ServerSettings,
    SettingsError,
    load_settings,
    setting_kinds,
)

__all__ = ["main", "run_server"]

logger = logging.getLogger("wshub")

METAVARS = {"int": "N", "float": "SECONDS", "str": "TEXT", "list": "A,B,..."}

HELP = {
    "host": "interface of the public WebSocket port",
    "port": "public WebSocket port (0 picks a free one)",
    "path": "the WebSocket endpoint",
    "api_host": "interface of the internal HTTP API (keep it private)",
    "api_port": "internal HTTP API port (0 picks a free one)",
    "certfile": "TLS certificate (PEM) for wss://, with --keyfile",
    "keyfile": "TLS private key (PEM)",
    "publish_token": "bearer token the internal API requires",
    "log_format": "text or json",
    "log_level": "debug, info, warning or error",
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
    return {name: text.replace("``", "") for name, text in helps.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wshub",
        description="A WebSocket fan-out hub for benchmark events.",
    )
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
    run.add_argument("--config", type=Path, help="TOML file with settings")
    kinds = setting_kinds()
    defaults = ServerSettings()
    helps = {**HELP, **_hub_field_help()}
    for name in (*SERVER_FIELDS, *HUB_FIELDS):
        owner: Any = defaults if name in SERVER_FIELDS else defaults.hub
        default = getattr(owner, name)
        shown = ",".join(default) if isinstance(default, tuple) else default
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
        description="POST one message to a running hub's /api/publish.",
    )
    publish.add_argument(
        "--url",
        default=os.environ.get("WSHUB_API_URL", "http://127.0.0.1:8081"),
        help="the internal API (default: http://127.0.0.1:8081; env WSHUB_API_URL)",
    )
    publish.add_argument("--type", required=True, dest="message_type", help="message type")
    publish.add_argument("--data", help="the data as JSON, or @FILE to read it from a file")
    publish.add_argument("--topics", help="comma-separated topics (default: every client)")
    publish.add_argument(
        "--token",
        default=os.environ.get("WSHUB_PUBLISH_TOKEN"),
        help="the hub's publish token (env WSHUB_PUBLISH_TOKEN)",
    )


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
        count = Publisher(args.url, token=args.token).publish(args.message_type, data, topics)
    except PublishError as exc:
        print(f"wshub publish: {exc}", file=sys.stderr)
        return 1
    print(f"queued for {count} clients")
    return 0


def _ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    if settings.certfile is None or settings.keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"certfile/keyfile: cannot load them: {exc}") from None
    return context


async def run_server(settings: ServerSettings, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set, or SIGINT/SIGTERM; then shut down gracefully.

    The public port also serves the browser dashboard (``GET /``): a standalone hub is
    what an operator opens in a browser.
    """
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    context = _ssl_context(settings)
    hub = Hub(settings.hub, logger=logger)
    async with serve(
        hub, settings.host, settings.port, path=settings.path, ssl=context, dashboard=True
    ) as server:
        port = server.sockets[0].getsockname()[1]
        scheme = "wss" if context else "ws"
        logger.info(
            "listening on %s://%s:%d%s with the %s core",
            scheme,
            settings.host,
            port,
            settings.path,
            hub.implementation,
        )
        web = "https" if context else "http"
        logger.info("dashboard on %s://%s:%d/", web, settings.host, port)
        api = await start_api(
            hub, settings.api_host, settings.api_port, publish_token=settings.publish_token
        )
        logger.info("internal API on %s", api.url)
        try:
            await stop.wait()
        finally:
            # The API first, so nothing publishes into a hub that is saying goodbye.
            await api.close()
        logger.info("shutting down: closing %d clients", hub.client_count)
    logger.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "publish":
        return _publish(parser, args)
    flags = {name: getattr(args, name) for name in (*SERVER_FIELDS, *HUB_FIELDS)}
    try:
        settings = load_settings(flags, config_file=args.config)
    except SettingsError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_format, settings.log_level)
    try:
        _run(run_server(settings))
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
