"""A small client of the hub's internal HTTP API, for scripts and services in other processes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["PublishError", "Publisher"]


class PublishError(RuntimeError):
    """The hub refused a publish, or could not be reached.

    Attributes:
        status: The HTTP status, or None when the hub was not reached.
        field: The request field the hub named as wrong, if any.
    """

    def __init__(self, message: str, status: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class Publisher:
    """Publishes to a hub through its internal API (``POST /api/publish``, ``/api/notify``).

    Args:
        url: The API's base URL, e.g. ``http://127.0.0.1:8081``.
        token: The hub's publish token, sent as ``Authorization: Bearer``.
        timeout: Seconds to wait for the hub.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8081",
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def publish(
        self, message_type: str, data: Any = None, topics: Iterable[str] | None = None
    ) -> int:
        """Publish one message to ``topics`` (every client when None).

        Returns:
            How many clients the hub queued it for.

        Raises:
            PublishError: The hub answered with an error or could not be reached.
        """
        body: dict[str, Any] = {"type": message_type, "data": data}
        if topics is not None:
            body["topics"] = list(topics)
        return self._post("/api/publish", body)

    def notify(self, kind: str, **payload: Any) -> int:
        """Send one of the runner's events, e.g. ``notify("run_progress", run_id=..., ...)``;
        the fields are those of the matching ``Hub.notify_*`` method.

        Returns:
            How many clients the hub queued it for.

        Raises:
            PublishError: The hub answered with an error or could not be reached.
        """
        return self._post(f"/api/notify/{kind}", payload)

    def _post(self, path: str, body: dict[str, Any]) -> int:
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.url + path, data=orjson.dumps(body), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise _refusal(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise PublishError(f"cannot reach the hub at {self.url}: {exc}") from None
        recipients: int = answer["recipients"]
        return recipients


def _refusal(error: urllib.error.HTTPError) -> PublishError:
    try:
        details = json.loads(error.read()).get("error", {})
    except (ValueError, AttributeError):
        details = {}
    message = details.get("message") or error.reason
    return PublishError(
        f"the hub refused the publish ({error.code}): {message}",
        status=error.code,
        field=details.get("field"),
    )
