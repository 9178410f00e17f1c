"""The hub's internal HTTP API: publishing, the runner's notifications, health and metrics.

The runner publishes over HTTP; operators scrape health checks and Prometheus metrics. The API
runs on the hub's own event loop (same process, same loop), so handlers call the hub's
synchronous publishing methods directly. Mount it on a port of its own, bound to 127.0.0.1 by
default, like Centrifugo's internal port::

    hub = wshub.Hub()
    async with wshub.serve(hub, "0.0.0.0", 8080):
        api = await start_api(hub, "127.0.0.1", 8081, publish_token="s3cret")
        try:
            await asyncio.Future()
        finally:
            await api.close()

Every endpoint, body, answer and error is described in docs/api.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import choose_encoder

from . import runner
from .backplane import NOT_PUBLISHED, UNKNOWN, BackplaneUnavailable
from .hub import Hub
from .idempotency import check_idempotency_key
from .metrics import LATENCY_BUCKETS, HubCollector
from .wire import (
    JSON_OPTIONS,
    MessageTooLarge,
    MessageType,
    check_message_key,
    check_message_type,
    did_you_mean,
    shown,
    topic_problem,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_PORT",
    "HUB_KEY",
    "IDEMPOTENCY_KEY_HEADER",
    "LATENCY_BUCKETS",
    "NOTIFY_KINDS",
    "REGISTRY_KEY",
    "ApiServer",
    "HubCollector",
    "create_api_app",
    "start_api",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8081
DEFAULT_MAX_BODY_SIZE: Final = 1024 * 1024

HUB_KEY: Final = web.AppKey("wshub.hub", Hub)
"""The :class:`~wshub.Hub` an application made by :func:`create_api_app` serves."""

REGISTRY_KEY: Final = web.AppKey("wshub.registry", CollectorRegistry)
"""The :class:`prometheus_client.CollectorRegistry` behind that application's ``/metrics``."""

_logger = logging.getLogger("wshub.api")

_JSON: Final = "application/json"
#: The header that carries a publish's idempotency key (as in the IETF httpapi draft).
IDEMPOTENCY_KEY_HEADER: Final = "Idempotency-Key"


class _ApiError(Exception):
    """An error answered as ``{"error": {"code", "message", "field"?}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        outcome: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers) if headers is not None else {}
        self.outcome = outcome


def _bad(field: str, message: str) -> _ApiError:
    return _ApiError(400, message, field=field)


def _json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type=_JSON, headers=headers
    )


def _error_response(error: _ApiError) -> web.Response:
    body: dict[str, Any] = {"code": error.status, "message": error.message}
    if error.field is not None:
        body["field"] = error.field
    answer: dict[str, Any] = {"error": body}
    if error.outcome is not None:
        # Beside the error, not in it: a publisher reads it to decide whether to retry.
        answer["outcome"] = error.outcome
    return _json_response(answer, error.status, error.headers)


# Validation. Every check runs before the hub is called, so a bad request changes nothing.


def _is_number(value: Any) -> bool:
    # bool is an int in Python but not a number in JSON.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _string(body: Mapping[str, Any], name: str, *, prefix: str = "") -> str:
    """A required non-empty string."""
    field = _path(prefix, name)
    if name not in body:
        raise _bad(field, f"{field} is required")
    value = body[name]
    if not isinstance(value, str) or not value:
        raise _bad(field, f"{field} must be a non-empty string")
    return value


def _optional_string(body: Mapping[str, Any], name: str, *, prefix: str = "") -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        field = _path(prefix, name)
        raise _bad(field, f"{field} must be a string or null")
    return value


def _number(
    body: Mapping[str, Any],
    name: str,
    *,
    required: bool,
    maximum: float | None = None,
) -> float | None:
    """A finite number from 0 (to ``maximum``); None when optional and absent or null."""
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(name, f"{name} is required")
        return None
    bound = f"0 to {maximum:g}" if maximum is not None else "0 or more"
    if not _is_number(value) or value < 0 or (maximum is not None and value > maximum):
        raise _bad(name, f"{name} must be a number from {bound}")
    result: float = value
    return result


def _integer(body: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    """A non-negative integer; None when optional and absent or null."""
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(name, f"{name} is required")
        return None
    if not _is_integer(value) or value < 0:
        raise _bad(name, f"{name} must be an integer, 0 or more")
    result: int = value
    return result


def _string_list(body: Mapping[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(name, f"{name} must be a list of strings or null")
    return value


def _object(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    if name not in body:
        raise _bad(name, f"{name} is required")
    value = body[name]
    if not isinstance(value, dict):
        raise _bad(name, f"{name} must be a JSON object")
    return value


def _record(body: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A run or regression object; its keys and values are checked by :mod:`wshub.runner`
    (its :class:`~wshub.runner.PayloadError` is a 400 naming the key)."""
    return _object(body, name)


def _idempotency_key(request: web.Request, body: Mapping[str, Any] | None) -> str | None:
    """The publish's key: the ``Idempotency-Key`` header, or the body's ``idempotency_key``
    (``POST /api/publish`` only); both given must agree."""
    header = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    given = body.get("idempotency_key") if body is not None else None
    if header is not None and given is not None and header != given:
        raise _bad(
            "idempotency_key", f"idempotency_key and the {IDEMPOTENCY_KEY_HEADER} header differ"
        )
    key = header if header is not None else given
    if key is None:
        return None
    try:
        return check_idempotency_key(key)
    except (TypeError, ValueError) as exc:
        raise _bad("idempotency_key", str(exc)) from None


def _topics(body: Mapping[str, Any]) -> list[str] | None:
    topics = body.get("topics")
    if topics is None:
        return None
    if not isinstance(topics, list):
        raise _bad("topics", "topics must be a list of strings or null")
    for index, topic in enumerate(topics):
        # The same rule as a client's subscriptions: a longer topic could never match.
        problem = topic_problem(topic)
        if problem is not None:
            raise _bad("topics", f"topics[{index}]: {problem}")
    return topics


def _serializable(field: str, value: Any, depth: int) -> None:
    """Raise a 400 naming ``field`` if ``value`` cannot be serialized at ``depth`` in data.

    orjson refuses to nest deeper than 254 levels while it parses up to 1024, so a body can
    parse and still be one the hub cannot send. ``depth`` counts the objects around the value
    in the message's ``data`` (0: it is the data).
    """
    wrapped = value
    for _ in range(depth):
        wrapped = {"": wrapped}
    try:
        orjson.dumps(wrapped, option=JSON_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise _bad(field, f"{field} cannot be serialized: {exc}") from None


class _Publish(NamedTuple):
    """What the hub publishes for a request; ``topics`` None sends to every client.

    ``suspects`` are the request's fields whose values land in ``data``, with their depth
    there: the one to blame when ``data`` cannot be serialized.
    """

    type: str
    data: Any
    topics: Sequence[str] | None
    suspects: tuple[tuple[str, Any, int], ...] = ()
    idempotency_key: str | None = None
    key: str | None = None

    @classmethod
    def of(
        cls,
        message_type: MessageType,
        event: runner.Event,
        suspects: tuple[tuple[str, Any, int], ...] = (),
    ) -> _Publish:
        """What the hub's ``notify_*`` would publish for ``event``."""
        return cls(message_type, event.data, event.topics, suspects, key=event.key)

    def serialized(self) -> orjson.Fragment | None:
        """``data`` serialized, once: the hub puts these bytes in the envelope as they are.

        Raises:
            _ApiError: 400 naming the field whose value cannot be serialized.
        """
        if self.data is None:
            return None
        try:
            return orjson.Fragment(orjson.dumps(self.data, option=JSON_OPTIONS))
        except orjson.JSONEncodeError as exc:
            for field, value, depth in self.suspects:
                _serializable(field, value, depth)
            field = self.suspects[0][0] if self.suspects else "data"
            raise _bad(field, f"{field} cannot be serialized: {exc}") from None


# The notifications: validate the body, then build the event the matching hub.notify_*
# would publish.


def _new_run(body: Mapping[str, Any], event_format: str) -> _Publish:
    run = _record(body, "run")
    # run.performance_scores -> data.summary.performance_scores, or data.performance_scores
    depth = 0 if event_format == "json-bench" else 1
    event = runner.new_run_event(run, event_format=event_format)
    return _Publish.of(MessageType.NEW_RUN, event, (("run", run, depth),))


def _regression_detected(body: Mapping[str, Any], event_format: str) -> _Publish:
    regression = _record(body, "regression")
    run = _record(body, "run")
    event = runner.regression_event(regression, run, event_format=event_format)
    # The regression's values land in data, the run's in data.run_info.
    suspects = (("regression", regression, 0), ("run", run, 1))
    return _Publish.of(MessageType.REGRESSION_DETECTED, event, suspects)


def _baseline_updated(body: Mapping[str, Any], event_format: str) -> _Publish:
    baseline_name = _string(body, "baseline_name")
    run_id = _string(body, "run_id")
    test_name = _string(body, "test_name")
    action = _optional_string(body, "action")
    return _Publish.of(
        MessageType.BASELINE_UPDATED,
        runner.baseline_updated_event(
            baseline_name,
            run_id,
            test_name,
            action if action is not None else "updated",
            event_format=event_format,
        ),
    )


def _analysis_complete(body: Mapping[str, Any], event_format: str) -> _Publish:
    run_id = _string(body, "run_id")
    test_name = _string(body, "test_name")
    if "analysis_results" not in body:
        raise _bad("analysis_results", "analysis_results is required")
    results = body["analysis_results"]
    event = runner.analysis_complete_event(run_id, test_name, results)
    suspects = (("analysis_results", results, 1),)  # data.analysis_results
    return _Publish.of(MessageType.ANALYSIS_COMPLETE, event, suspects)


def _run_started(body: Mapping[str, Any], event_format: str) -> _Publish:
    run_id = _string(body, "run_id")
    test_name = _string(body, "test_name")
    details: dict[str, Any] = {
        "git_commit": _optional_string(body, "git_commit"),
        "git_branch": _optional_string(body, "git_branch"),
        "clients": _string_list(body, "clients"),
        "methods": _string_list(body, "methods"),
        "planned_requests": _integer(body, "planned_requests", required=False),
        "started_at": _optional_string(body, "started_at"),
    }
    return _Publish.of(
        MessageType.RUN_STARTED, runner.run_started_event(run_id, test_name, **details)
    )


def _run_progress(body: Mapping[str, Any], event_format: str) -> _Publish:
    run_id = _string(body, "run_id")
    test_name = _string(body, "test_name")
    progress = _number(body, "progress", required=True, maximum=1.0)
    assert progress is not None  # required
    details: dict[str, Any] = {
        "elapsed_s": _number(body, "elapsed_s", required=True),
        "requests_done": _integer(body, "requests_done", required=True),
        "current_rps": _number(body, "current_rps", required=True),
        "error_rate": _number(body, "error_rate", required=True),
    }
    return _Publish.of(
        MessageType.RUN_PROGRESS,
        runner.run_progress_event(run_id, test_name, progress, **details),
    )


def _run_complete(body: Mapping[str, Any], event_format: str) -> _Publish:
    run_id = _string(body, "run_id")
    test_name = _string(body, "test_name")
    details: dict[str, Any] = {
        "duration_s": _number(body, "duration_s", required=False),
        "total_requests": _integer(body, "total_requests", required=False),
        "total_errors": _integer(body, "total_errors", required=False),
        "error_rate": _number(body, "error_rate", required=False),
    }
    return _Publish.of(
        MessageType.RUN_COMPLETE, runner.run_complete_event(run_id, test_name, **details)
    )


def _run_failed(body: Mapping[str, Any], event_format: str) -> _Publish:
    run_id = _string(body, "run_id")
    test_name = _string(body, "test_name")
    error = _string(body, "error")
    elapsed_s = _number(body, "elapsed_s", required=False)
    return _Publish.of(
        MessageType.RUN_FAILED,
        runner.run_failed_event(run_id, test_name, error, elapsed_s=elapsed_s),
    )


# Each takes the body and the hub's event_format; only new_run, regression_detected and
# baseline_updated have a json-bench shape.
_NOTIFIERS: Final[Mapping[str, Callable[[Mapping[str, Any], str], _Publish]]] = {
    "new_run": _new_run,
    "regression_detected": _regression_detected,
    "baseline_updated": _baseline_updated,
    "analysis_complete": _analysis_complete,
    "run_started": _run_started,
    "run_progress": _run_progress,
    "run_complete": _run_complete,
    "run_failed": _run_failed,
}

# The keys each body may have: any other is refused, so a misspelt one is an error rather
# than a value silently missing from every dashboard. A notify body's keys are the
# parameters of its runner event builder but the hub's event_format.
_BODY_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "publish": frozenset({"type", "data", "topics", "idempotency_key", "key"}),
    **{
        str(kind): frozenset(inspect.signature(builder).parameters) - {"event_format"}
        for kind, builder in runner.EVENT_BUILDERS.items()
    },
}


def _known_keys(body: Mapping[str, Any], endpoint: str) -> None:
    """Refuse a key the endpoint does not take, naming it and the closest one it takes."""
    allowed = _BODY_KEYS[endpoint]
    for key in body:
        if key not in allowed:
            raise _bad(key, f"{key} is not a key of this body{did_you_mean(key, allowed)}")


NOTIFY_KINDS: Final = tuple(_NOTIFIERS)
"""The ``<kind>`` values of ``POST /api/notify/<kind>``: the runner's eight event types."""


class _Api:
    """The handlers of one application, bound to one hub and one histogram."""

    def __init__(
        self,
        hub: Hub,
        *,
        publish_token: str | None,
        max_body_size: int,
        registry: CollectorRegistry,
        allowed_origins: Sequence[str],
    ) -> None:
        self.hub = hub
        self.max_body_size = max_body_size
        self.allowed_origins = frozenset(allowed_origins)
        self.registry = registry
        self._token = publish_token.encode() if publish_token is not None else None
        registry.register(HubCollector(hub))
        self.latency = Histogram(
            "wshub_api_publish_to_flush_seconds",
            "Seconds from an HTTP publish or notify calling the hub to the end of the "
            "flush that writes it to clients' transports (publishes that reached at least "
            "one client; upper bound: measured by the first loop callback after that flush).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    # Middleware

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer every error as JSON; an unexpected exception is logged and answered 500."""
        try:
            return await handler(request)
        except _ApiError as error:
            return _error_response(error)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return _error_response(_ApiError(exc.status, exc.reason, headers=headers))
        except asyncio.CancelledError:
            raise
        except Exception:
            _logger.exception("error handling %s %s", request.method, request.path)
            return _error_response(_ApiError(500, "internal error"))

    @web.middleware
    async def browsers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Refuse a POST a web page could make: one from an origin not allowed, or one whose
        body is not declared JSON (a form or ``text/plain`` post needs no CORS preflight, so
        any page a browser on this host opens could send it)."""
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin is not None and origin not in self.allowed_origins:
                raise _ApiError(403, f"requests from origin {shown(origin)!r} are not allowed")
            if request.content_type != _JSON:
                raise _ApiError(415, "Content-Type must be application/json")
        return await handler(request)

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Check the bearer token on ``/api/*`` before any body is read."""
        if self._token is not None and (
            request.path == "/api" or request.path.startswith("/api/")
        ):
            self._check_token(request.headers.get("Authorization"))
        return await handler(request)

    def _check_token(self, header: str | None) -> None:
        assert self._token is not None
        if header is None:
            raise _ApiError(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, credentials = header.strip().partition(" ")
        # backslashreplace: a header with odd characters must fail the comparison, not raise.
        given = credentials.strip().encode("utf-8", "backslashreplace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token):
            raise _ApiError(
                401,
                "invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    # Bodies

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object; 413 past ``max_body_size``, 400 when not an object."""
        limit = self.max_body_size
        length = request.content_length
        if length is not None and length > limit:
            raise _ApiError(413, f"request body is larger than {limit} bytes")
        # Read with our own cap rather than client_max_size, whose bound (> or >=) has
        # changed between aiohttp releases; this also covers chunked bodies.
        raw = bytearray()
        try:
            async for chunk in request.content.iter_any():
                raw += chunk
                if len(raw) > limit:
                    raise _ApiError(413, f"request body is larger than {limit} bytes")
        except (ConnectionError, HttpProcessingError) as exc:
            # The client went away or sent a broken chunked body: its fault, not worth a
            # traceback in the log; the answer goes nowhere or tells it what broke.
            raise _bad("body", f"request body could not be read: {exc}") from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _bad("body", f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("body", "request body must be a JSON object")
        return body

    # Publishing

    async def _publish(self, publish: _Publish) -> web.Response:
        """Publish, schedule the latency observation and answer with the id and the count.

        Through :meth:`Hub.publish`: with a backplane the answer comes once the message is in
        Redis and this hub has queued it, and a Redis outage is a 503, not a lost message.
        """
        if not self.hub.running:
            raise _ApiError(503, "the hub is not running", outcome=NOT_PUBLISHED)
        data = publish.serialized()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            published = await self.hub.publish(
                publish.type,
                data,
                publish.topics,
                idempotency_key=publish.idempotency_key,
                key=publish.key,
            )
        except BackplaneUnavailable as exc:
            if exc.outcome == UNKNOWN:
                raise _ApiError(503, str(exc), outcome=UNKNOWN) from None
            raise _ApiError(503, f"not published: {exc}", outcome=NOT_PUBLISHED) from None
        except MessageTooLarge as exc:
            raise _ApiError(413, str(exc)) from None
        except RuntimeError as exc:
            if self.hub.running:
                raise  # a fault inside the hub: the error middleware's 500
            raise _ApiError(503, str(exc), outcome=NOT_PUBLISHED) from None  # it stopped
        except (TypeError, ValueError) as exc:  # validation above should have caught it
            raise _bad("body", str(exc)) from None
        recipients = published.recipients
        if recipients:
            # The core schedules its flush with call_soon (or call_later(flush_interval))
            # from inside publish(), so a callback queued now runs after that flush. With a
            # flush interval, a flush scheduled earlier is due no later than ours; the extra
            # call_soon puts the observation behind every timer due in the same iteration.
            interval = self.hub.config.flush_interval
            if interval > 0:
                loop.call_later(interval, loop.call_soon, self._observe, started)
            else:
                loop.call_soon(self._observe, started)
        answer: dict[str, Any] = {"id": published.id, "recipients": recipients}
        if published.duplicate:
            answer["duplicate"] = True
        return _json_response(answer)

    def _observe(self, started: float) -> None:
        self.latency.observe(time.perf_counter() - started)

    async def publish(self, request: web.Request) -> web.Response:
        """``POST /api/publish``."""
        body = await self._body(request)
        _known_keys(body, "publish")
        message_type = body.get("type")
        try:
            check_message_type(message_type)
        except TypeError:
            raise _bad("type", "type must be a non-empty string") from None
        except ValueError:
            raise _bad("type", f"type {message_type!r} is reserved for the protocol") from None
        topics = _topics(body)
        data = body.get("data")
        idempotency_key = _idempotency_key(request, body)
        key = body.get("key")
        if key is not None:
            try:
                check_message_key(key)
            except (TypeError, ValueError) as exc:
                raise _bad("key", str(exc)) from None
        return await self._publish(
            _Publish(str(message_type), data, topics, (("data", data, 0),), idempotency_key, key)
        )

    async def notify(self, request: web.Request) -> web.Response:
        """``POST /api/notify/{kind}``."""
        kind = request.match_info["kind"]
        notifier = _NOTIFIERS.get(kind)
        if notifier is None:
            raise _ApiError(404, f"unknown notify kind {kind!r}; known: {', '.join(NOTIFY_KINDS)}")
        body = await self._body(request)
        _known_keys(body, kind)
        key = _idempotency_key(request, None)
        try:
            publish = notifier(body, self.hub.event_format)
        except runner.PayloadError as exc:
            raise _bad(exc.field, str(exc)) from None
        return await self._publish(publish._replace(idempotency_key=key))

    # Introspection

    async def clients(self, request: web.Request) -> web.Response:
        """``GET /api/clients``."""
        return _json_response(self.hub.client_info())

    async def topics(self, request: web.Request) -> web.Response:
        """``GET /api/topics``: subscribers and watchers of every topic held, or of one
        (``?topic=``), on every hub joined with this one."""
        topic = request.query.get("topic")
        if topic is not None:
            problem = topic_problem(topic)
            if problem is not None:
                raise _bad("topic", problem)
        audience = await self.hub.audience()
        if topic is not None:
            return _json_response(
                {
                    "topic": topic,
                    "subscribers": audience.subscribers(topic),
                    "watchers": audience.watchers(topic),
                    "hubs": audience.hubs,
                }
            )
        return _json_response({"topics": audience.by_topic(), "hubs": audience.hubs})

    async def stats(self, request: web.Request) -> web.Response:
        """``GET /api/stats``."""
        return _json_response(self.hub.stats())

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: the process answers."""
        return _json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """``GET /readyz``: 200 while the hub runs and its backplane answers, else 503."""
        hub = self.hub
        if hub.ready:
            return _json_response({"status": "ready"})
        if not hub.running:
            return _json_response({"status": "not ready", "reason": "the hub is not running"}, 503)
        backplane = hub.backplane
        why = (backplane.last_error if backplane is not None else None) or (
            "the backplane is not connected"
        )
        return _json_response({"status": "not ready", "reason": f"backplane: {why}"}, 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``: the registry in the format the scraper asks for."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})


def create_api_app(
    hub: Hub,
    *,
    publish_token: str | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    registry: CollectorRegistry | None = None,
    allowed_origins: Sequence[str] = (),
) -> web.Application:
    """Build the aiohttp application of the internal API for ``hub``.

    The application must run on the hub's event loop. ``app[HUB_KEY]`` is the hub and
    ``app[REGISTRY_KEY]`` the metrics registry.

    Args:
        hub: The hub to publish to and report on; it may be started later.
        publish_token: When set, every ``/api/*`` route needs ``Authorization: Bearer
            <publish_token>``; ``/healthz``, ``/readyz`` and ``/metrics`` stay open.
        max_body_size: Largest request body in bytes; larger ones are answered 413.
        registry: Where the hub's metrics are registered; a new registry when None. One
            registry serves one application: the metric names would clash.
        allowed_origins: Browser origins whose pages may POST here; a POST with any other
            ``Origin`` header is answered 403. Programs send no ``Origin``. Every POST must
            say ``Content-Type: application/json`` (else 415).

    Returns:
        The application, ready for an :class:`aiohttp.web.AppRunner`.

    Raises:
        TypeError: ``hub`` is not a :class:`~wshub.Hub`.
        ValueError: ``publish_token`` is empty, ``max_body_size`` is not a positive integer,
            or ``registry`` already holds metrics of these names.
    """
    if not isinstance(hub, Hub):
        raise TypeError(f"hub must be a wshub.Hub, got {hub!r}")
    if publish_token is not None and (not isinstance(publish_token, str) or not publish_token):
        # An empty token would read as "auth on" but accept "Bearer " from anyone.
        raise ValueError("publish_token must be a non-empty string or None")
    if not _is_integer(max_body_size) or max_body_size < 1:
        raise ValueError(f"max_body_size must be a positive integer, got {max_body_size!r}")
    if registry is None:
        registry = CollectorRegistry()
    api = _Api(
        hub,
        publish_token=publish_token,
        max_body_size=max_body_size,
        registry=registry,
        allowed_origins=allowed_origins,
    )
    # errors wraps the others, so a 403, 415 or 401 is answered as JSON like every error.
    app = web.Application(middlewares=[api.errors, api.browsers, api.auth])
    app[HUB_KEY] = hub
    app[REGISTRY_KEY] = registry
    app.router.add_post("/api/publish", api.publish)
    app.router.add_post("/api/notify/{kind}", api.notify)
    app.router.add_get("/api/clients", api.clients)
    app.router.add_get("/api/stats", api.stats)
    app.router.add_get("/api/topics", api.topics)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    return app


@dataclasses.dataclass(frozen=True, slots=True)
class ApiServer:
    """A started API: the runner, and where it listens.

    Use ``await api.close()`` (or ``async with await start_api(...)``) to stop it; that is
    ``await api.runner.cleanup()``.

    Attributes:
        runner: The started :class:`aiohttp.web.AppRunner`.
        host: The host it was bound to.
        port: The port of its first listening socket, the real one when 0 was asked for.
    """

    runner: web.AppRunner
    host: str
    port: int

    @property
    def app(self) -> web.Application:
        """The application being served."""
        return self.runner.app

    @property
    def url(self) -> str:
        """``http://host:port``, with IPv6 hosts in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and clean up the runner; the hub is left running."""
        await self.runner.cleanup()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def start_api(
    hub: Hub,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    publish_token: str | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    registry: CollectorRegistry | None = None,
    reuse_port: bool = False,
    allowed_origins: Sequence[str] = (),
) -> ApiServer:
    """Serve the internal API of ``hub`` on ``host:port`` on the running event loop.

    Args:
        hub: The hub, on this event loop.
        host: Address to bind; the loopback interface by default, as the API is internal.
        port: Port to bind; 0 picks a free one (read it from :attr:`ApiServer.port`).
        publish_token: See :func:`create_api_app`.
        max_body_size: See :func:`create_api_app`.
        registry: See :func:`create_api_app`.
        allowed_origins: See :func:`create_api_app`.
        reuse_port: Bind with ``SO_REUSEPORT``, so that several processes share the port
            and the kernel spreads connections over them (``wshub serve --workers``).

    Returns:
        The started server; the caller stops it with ``await server.close()``.

    Raises:
        OSError: The address cannot be bound.
        TypeError: See :func:`create_api_app`.
        ValueError: See :func:`create_api_app`.
    """
    app = create_api_app(
        hub,
        publish_token=publish_token,
        max_body_size=max_body_size,
        registry=registry,
        allowed_origins=allowed_origins,
    )
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
        await site.start()
        bound_port: int = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return ApiServer(runner=runner, host=host, port=bound_port)
