"""``python -m wshub serve`` in a subprocess, for the tests that drive it from outside
(the dashboard in a browser, wshub.js under Node, hubs joined through Redis)."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ApiError", "HubProcess"]

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)/api/ws")
API = re.compile(r"internal API on (http://127\.0\.0\.1:(\d+))")
START_TIMEOUT = 20.0
REQUEST_TIMEOUT = 10.0


class ApiError(Exception):
    """The internal API answered with an error status.

    Attributes:
        status: The HTTP status.
        answer: The decoded JSON body (``{"error": ...}``), or None when there was none.
    """

    def __init__(self, status: int, answer: Any) -> None:
        super().__init__(f"HTTP {status}: {answer}")
        self.status = status
        self.answer = answer


class HubProcess:
    """A hub on 127.0.0.1, its ports read from its log.

    A thread drains stderr for the life of the process, so a chatty server never blocks on a
    full pipe, and keeps every line for failure messages.

    Args:
        port: The public port; 0 picks a free one.
        api_port: The internal API's port; 0 picks a free one.
        extra: More arguments for ``wshub serve``, such as ``["--redis-url", url]``.
    """

    def __init__(self, port: int = 0, api_port: int = 0, extra: Sequence[str] = ()) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wshub",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-port",
                str(api_port),
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.port = int(self._wait_for(LISTENING).group(1))
            api = self._wait_for(API)
        except AssertionError:
            self.stop()
            raise
        self.api, self.api_port = api.group(1), int(api.group(2))

    @property
    def output(self) -> str:
        return "".join(self.log)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for(self, pattern: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"wshub serve did not start:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"wshub serve exited early:\n{self.output}")
            if match := pattern.search(line):
                return match

    def notify(self, kind: str, body: dict[str, Any]) -> int:
        """``POST /api/notify/<kind>``; returns the number of clients reached."""
        status, answer = self._request("POST", f"/api/notify/{kind}", body)
        if status != 200:
            raise ApiError(status, answer)
        recipients: int = answer["recipients"]
        return recipients

    def publish(
        self,
        message_type: str,
        data: Any = None,
        topics: Sequence[str] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """``POST /api/publish``; returns the answer, ``{"id": ..., "recipients": ...}``.

        Raises:
            ApiError: The API refused it (503 while Redis is unreachable, 400, ...).
        """
        body: dict[str, Any] = {"type": message_type, "data": data}
        if topics is not None:
            body["topics"] = list(topics)
        if key is not None:
            body["key"] = key
        status, answer = self._request("POST", "/api/publish", body)
        if status != 200:
            raise ApiError(status, answer)
        result: dict[str, Any] = answer
        return result

    def stats(self) -> dict[str, Any]:
        """``GET /api/stats``."""
        status, answer = self._request("GET", "/api/stats")
        if status != 200:
            raise ApiError(status, answer)
        result: dict[str, Any] = answer
        return result

    def ready(self) -> int:
        """The status of ``GET /readyz``: 200 when ready, 503 when not."""
        status, _ = self._request("GET", "/readyz")
        return status

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """The status and the decoded JSON answer of one request to the internal API."""
        request = urllib.request.Request(
            self.api + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as error:
            # An HTTPError holds the response open: close it, or it warns when collected.
            with error:
                text = error.read()
            return error.code, json.loads(text) if text else None

    def stop(self) -> int | None:
        """SIGTERM, as an operator would; SIGKILL if it has not exited in time.

        Returns:
            The exit code after SIGTERM (0 for a graceful shutdown), or None when it had to
            be killed.
        """
        code: int | None = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        else:
            code = self.process.returncode
        # The pipe ends with the process; close it here, not in the garbage collector (an
        # unclosed file is a ResourceWarning, and warnings are errors here).
        self._reader.join(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code
