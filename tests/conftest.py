"""The hub served on 127.0.0.1 for tests over real sockets (cores and loops: ../conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import wshub

from .helpers import HubServer


@pytest.fixture
def hub_server(
    implementation: str,
) -> Callable[..., contextlib.AbstractAsyncContextManager[HubServer]]:
    """Start a hub with the given config fields, served on a free port of 127.0.0.1."""

    @contextlib.asynccontextmanager
    async def start(**config: Any) -> AsyncIterator[HubServer]:
        config.setdefault("log_connection_events", False)
        serve_options = config.pop("serve_options", {})
        hub_class = config.pop("hub_class", wshub.Hub)
        hub = hub_class(wshub.HubConfig(**config), implementation=implementation)
        async with wshub.serve(hub, "127.0.0.1", 0, **serve_options) as server:
            port = server.sockets[0].getsockname()[1]
            yield HubServer(hub, server, f"ws://127.0.0.1:{port}/api/ws")

    return start
