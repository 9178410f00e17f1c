"""Shared fixtures: both fan-out cores, both event loops, and a hub served on 127.0.0.1.

Every hub test runs four times: {cython, python} core x {asyncio, uvloop} loop. A missing
compiled core fails those tests; ``--no-extensions`` deselects them instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import uvloop

import wshub
from wshub.fanout import core_module

from .helpers import HubServer

IMPLEMENTATIONS = ("cython", "python")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-extensions",
        action="store_true",
        help="test only the pure-Python fan-out core (the compiled one is not built)",
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--no-extensions"):
        return
    deselected = [item for item in items if _uses_compiled_core(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


def _uses_compiled_core(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("implementation") == "cython"


@pytest.fixture(scope="session", params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    """The name of a fan-out core; the compiled one must be importable."""
    name: str = request.param
    if name == "cython":
        try:
            importlib.import_module("wshub._fanout")
        except ImportError as exc:
            pytest.fail(
                f"the compiled fan-out core is not built ({exc}); build it with "
                "'pip install -e .' or pass --no-extensions",
                pytrace=False,
            )
    return name


@pytest.fixture(scope="session")
def core(implementation: str) -> Any:
    """The fan-out core module named by ``implementation``."""
    return core_module(implementation)  # type: ignore[arg-type]


@pytest.fixture
def hub_server(
    implementation: str,
) -> Callable[..., contextlib.AbstractAsyncContextManager[HubServer]]:
    """Start a hub with the given config fields, served on a free port of 127.0.0.1."""

    @contextlib.asynccontextmanager
    async def start(**config: Any) -> AsyncIterator[HubServer]:
        config.setdefault("log_connection_events", False)
        serve_options = config.pop("serve_options", {})
        hub = wshub.Hub(wshub.HubConfig(**config), implementation=implementation)
        async with wshub.serve(hub, "127.0.0.1", 0, **serve_options) as server:
            port = server.sockets[0].getsockname()[1]
            yield HubServer(hub, server, f"ws://127.0.0.1:{port}/api/ws")

    return start
