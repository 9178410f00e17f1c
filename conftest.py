"""Both fan-out cores and both event loops, for the tests and the benchmarks alike.

Every test that takes ``implementation`` (or ``core``) runs against the compiled and the
pure-Python core, and every async test under asyncio and uvloop. A missing compiled core fails
those tests; ``--no-extensions`` deselects them instead.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop

from wshub.fanout import core_module

IMPLEMENTATIONS = ("cython", "python")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-extensions",
        action="store_true",
        help="test only the pure-Python fan-out core (the compiled one is not built)",
    )
    parser.addoption(
        "--skip-missing-tools",
        action="store_true",
        help="skip, instead of failing, the tests whose Node, Chromium or Redis cannot be had",
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
