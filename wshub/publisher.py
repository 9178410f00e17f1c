"""A small client of the hub's internal HTTP API, for scripts and services in other processes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson

# The outcomes a hub answers with: NOT_PUBLISHED (it did not reach the hub, or the hub
# refused it), UNKNOWN (the request was sent and no answer came, or the hub's Redis went
# quiet after the message was sent).
from .backplane import NOT_PUBLISHED, UNKNOWN
from .hub import Published

__all__ = ["NOT_PUBLISHED", "RETRY_DELAY", "UNKNOWN", "PublishError", "Publisher"]


#: First and longest wait between two attempts at one publish, in seconds.
RETRY_DELAY: Final = (0.1, 2.0)


class PublishError(RuntimeError):
    """The hub refused a publish, or could not be reached.

    Attributes:
        status: The HTTP status, or None when the hub was not reached.
        field: The request field the hub named as wrong, if any.
        outcome: :data:`NOT_PUBLISHED`, or :data:`UNKNOWN` when an attempt may have been
            delivered (it would be delivered once: every attempt carried the same key).
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        field: str | None = None,
        outcome: str = NOT_PUBLISHED,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.outcome = outcome


class Publisher:
    """Publishes to a hub through its internal API (``POST /api/publish``, ``/api/notify``).

    Every publish carries an idempotency key (the caller's, or a fresh random one), so that
    retrying it is safe: while the hub answers 503 (Redis unreachable or frozen, the hub
    restarting) or cannot be reached, the same request is sent again with a growing delay for
    up to ``retry_for`` seconds, and the hub delivers it once however many attempts reached it.

    Args:
        url: The API's base URL, e.g. ``http://127.0.0.1:8081``.
        token: The hub's publish token, sent as ``Authorization: Bearer``.
        timeout: Seconds to wait for the hub, per attempt.
        retry_for: Seconds to keep retrying a publish after its first attempt; 0 tries once.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8081",
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry_for: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retry_for = retry_for

    def publish(
        self,
        message_type: str,
        data: Any = None,
        topics: Iterable[str] | None = None,
        *,
        idempotency_key: str | None = None,
        key: str | None = None,
    ) -> Published:
        """Publish one message to ``topics`` (every client when None).

        Args:
            message_type: The envelope's ``type``.
            data: The envelope's ``data``.
            topics: The topics; None sends to every client.
            idempotency_key: Publishes with the same key within the hub's
                ``idempotency_window`` are delivered once; None takes a fresh random key, so
                that only this call's own retries are recognised.
            key: The message's conflation key: a newer message with the same key supersedes
                it in the queue of a client that fell behind (see :meth:`Hub.publish`).

        Returns:
            What the hub did, as :meth:`Hub.publish` says it: the message's id, how many of
            its clients it queued it for, and ``duplicate`` when the key had already been
            published (by an earlier call, or by an attempt of this one whose answer was
            lost): nothing was sent again, and ``id`` is the first publish's.

        Raises:
            PublishError: The hub refused it, or still could not take it after ``retry_for``.
        """
        body: dict[str, Any] = {"type": message_type, "data": data}
        if topics is not None:
            body["topics"] = list(topics)
        if key is not None:
            body["key"] = key
        return self._post("/api/publish", body, idempotency_key)

    def notify(
        self,
        kind: str,
        body: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Published:
        """Send one of the runner's events, e.g. ``notify("run_progress", run_id=..., ...)``
        or ``notify("new_run", {"run": {...}})``: the body's keys (``body`` and ``fields``
        together) are the parameters of the matching ``Hub.notify_*`` method, checked by the
        hub as it checks the runner's. Retried as :meth:`publish` is.

        Returns:
            What the hub did, as for :meth:`publish`.

        Raises:
            PublishError: The hub refused it, or still could not take it after ``retry_for``.
        """
        return self._post(f"/api/notify/{kind}", {**(body or {}), **fields}, idempotency_key)

    def watchers(self, topic: str) -> int:
        """How many clients of the hub a message to ``topic`` would reach now (subscribed
        to it or to ``"*"``): publish fine-grained progress only while someone watches.

        Raises:
            PublishError: The hub refused the question (a bad topic: 400), or could not be
                reached.
        """
        query = urllib.parse.urlencode({"topic": topic})
        request = urllib.request.Request(f"{self.url}/api/topics?{query}", headers=self._auth())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise _refusal(exc, "the question") from None
        except (urllib.error.URLError, OSError) as exc:
            raise PublishError(f"cannot reach the hub at {self.url}: {exc}") from None
        watchers: int = answer["watchers"]
        return watchers

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}

    def _post(self, path: str, body: dict[str, Any], idempotency_key: str | None) -> Published:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key or uuid.uuid4().hex,
            **self._auth(),
        }
        payload = orjson.dumps(body)
        deadline = time.monotonic() + self.retry_for
        delay = RETRY_DELAY[0]
        maybe_delivered = False
        while True:
            try:
                return self._attempt(path, payload, headers)
            except PublishError as exc:
                maybe_delivered = maybe_delivered or exc.outcome == UNKNOWN
                retryable = exc.status is None or exc.status == 503
                if not retryable or time.monotonic() + delay > deadline:
                    if maybe_delivered:
                        exc.outcome = UNKNOWN
                    raise
            time.sleep(delay)
            delay = min(delay * 2, RETRY_DELAY[1])

    def _attempt(self, path: str, payload: bytes, headers: dict[str, str]) -> Published:
        request = urllib.request.Request(
            self.url + path, data=payload, headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise _refusal(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            # Refused: nothing was sent. Anything else may have failed after the request.
            refused = isinstance(reason, ConnectionRefusedError)
            raise PublishError(
                f"cannot reach the hub at {self.url}: {exc}",
                outcome=NOT_PUBLISHED if refused else UNKNOWN,
            ) from None
        return Published(answer["id"], answer["recipients"], answer.get("duplicate", False))


def _refusal(error: urllib.error.HTTPError, what: str = "the publish") -> PublishError:
    try:
        answer = json.loads(error.read())
        details = answer.get("error", {})
        outcome = answer.get("outcome")
    except (ValueError, AttributeError):
        details, outcome = {}, None
    message = details.get("message") or error.reason
    return PublishError(
        f"the hub refused {what} ({error.code}): {message}",
        status=error.code,
        field=details.get("field"),
        outcome=UNKNOWN if outcome == UNKNOWN else NOT_PUBLISHED,
    )
