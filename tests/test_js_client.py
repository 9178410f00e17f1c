"""``wshub/static/wshub.js`` under Node against a real ``python -m wshub serve``.

The JavaScript tests are ``tests/js/client_test.mjs``; this runs them with ``node --test``,
the hub's URLs in ``WSHUB_WS_URL`` and ``WSHUB_API_URL``, and those of a second hub that
requires tokens in ``WSHUB_AUTH_WS_URL`` and ``WSHUB_AUTH_API_URL`` with the secret that signs
them in ``WSHUB_AUTH_SECRET``. When the script asks for a restart
(it prints ``RESTART`` and creates the file named by ``WSHUB_RESTART_FILE``: node --test gives
it no stdin, and its stdout can reach us late) the hub is stopped with SIGTERM (its clients get
1001 "server shutdown") and a new one is started on the same two ports; the client's
reconnection tells the script it is back.
Node and the ``ws`` package come as ``tests/tools.py`` says.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from .helpers import SECRET
from .processes import HubProcess
from .tools import require_node_packages

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "js"
SCRIPT = JS / "client_test.mjs"

START_TIMEOUT = 20.0
NODE_TIMEOUT = 180.0


# The main hub compresses (the default, said here for the reader): ws negotiates
# permessage-deflate by default, so every test against it decodes the hub's shared compressed
# frames; the hub that requires tokens sends plain ones.
COMPRESSED = ("--compression", "deflate")


def restart(hub: HubProcess) -> HubProcess:
    """Stop ``hub`` and start a new one on the same ports (retrying while they are busy)."""
    hub.stop()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            return HubProcess(hub.port, hub.api_port, extra=COMPRESSED)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def auth_hub(tmp_path: Path) -> Iterator[HubProcess]:
    """A hub that requires subscriber tokens signed with ``SECRET``, strict about expiry
    (no leeway), so that a token minted to expire in 2 s does."""
    secret_file = tmp_path / "auth-secret"
    secret_file.write_text(SECRET)
    hub = HubProcess(
        extra=[
            "--auth-required",
            "--auth-secret-file",
            str(secret_file),
            "--auth-leeway",
            "0",
            "--compression",
            "off",
        ]
    )
    yield hub
    hub.stop()


def test_wshub_js_against_a_real_hub(
    pytestconfig: pytest.Config, tmp_path: Path, auth_hub: HubProcess
) -> None:
    node = require_node_packages(pytestconfig)

    hubs = [HubProcess(extra=COMPRESSED)]
    restart_file = tmp_path / "restart"
    output: list[str] = []

    def read(stream: IO[str]) -> None:
        with stream:
            output.extend(stream)

    environment = {
        **os.environ,
        "WSHUB_WS_URL": f"ws://127.0.0.1:{hubs[0].port}/api/ws",
        "WSHUB_API_URL": f"http://127.0.0.1:{hubs[0].api_port}",
        "WSHUB_RESTART_FILE": str(restart_file),
        "WSHUB_AUTH_WS_URL": f"ws://127.0.0.1:{auth_hub.port}/api/ws",
        "WSHUB_AUTH_API_URL": f"http://127.0.0.1:{auth_hub.api_port}",
        "WSHUB_AUTH_SECRET": SECRET,
        "NO_COLOR": "1",
    }
    try:
        process = subprocess.Popen(
            [node, "--test", "--test-reporter=spec", str(SCRIPT.relative_to(ROOT))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=environment,
        )
        reader = threading.Thread(target=read, args=(process.stdout,), daemon=True)
        reader.start()
        restarted = False
        deadline = time.monotonic() + NODE_TIMEOUT
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                reader.join(timeout=5)
                pytest.fail(f"node did not finish in {NODE_TIMEOUT} s:\n{''.join(output)}")
            time.sleep(0.05)
            if not restarted and restart_file.exists():
                restarted = True
                hubs.append(restart(hubs[-1]))
        reader.join(timeout=5)
        report = "".join(output)
        logs = "\n".join(hub.output for hub in (*hubs, auth_hub))
        assert process.returncode == 0, f"node failed:\n{report}\nhub logs:\n{logs}"
        assert restarted, f"the restart test did not run:\n{report}"
        assert re.search(r"\bskipped 0\b", report), f"some tests were skipped:\n{report}"
    finally:
        for hub in hubs:
            hub.stop()
