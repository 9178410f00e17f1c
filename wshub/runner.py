"""The benchmark runner's domain, the payloads of its notifications and the hub's
``notify_*`` methods.

Field names are the runner's JSON names, so a runner can hand over either these dataclasses
or the plain mappings it already has. Each ``*_event`` function returns the message's ``data``
and its topics: the message type, ``run:<run_id>`` and ``test:<test_name>`` where known.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final, NamedTuple, TypeVar

from .wire import MessageClock, MessageType, did_you_mean

__all__ = [
    "EVENT_BUILDERS",
    "Event",
    "HistoricRun",
    "PayloadError",
    "Regression",
    "RunnerNotifications",
    "analysis_complete_event",
    "baseline_updated_event",
    "new_run_event",
    "regression_event",
    "run_complete_event",
    "run_failed_event",
    "run_key",
    "run_progress_event",
    "run_started_event",
]

Timestamp = datetime | str


class Event(NamedTuple):
    """One runner event as the hub publishes it.

    Attributes:
        data: The event's ``data``.
        topics: The topics it goes to: its type, ``run:<id>`` and ``test:<name>``.
        key: Its conflation key: ``run:<id>`` for the four events of a run in progress, so
            that a newer one supersedes an older one a slow client has not read yet (the
            latest state of the run is what it needs); None for the others, events that a
            client must never lose (``new_run``, ``regression_detected``, ...).
    """

    data: dict[str, Any]
    topics: list[str]
    key: str | None = None


def run_key(run_id: str) -> str:
    """The conflation key of a run's ``run_*`` events."""
    return f"run:{run_id}"


@dataclasses.dataclass
class HistoricRun:
    """A finished benchmark run as the runner stores it (its JSON names).

    Every field but ``id`` may be missing: a missing value is None, and reaches clients as
    ``null``, never as a made-up 0.
    """

    id: str
    timestamp: Timestamp | None = None
    git_commit: str | None = None
    git_branch: str | None = None
    test_name: str | None = None
    description: str | None = None
    config_hash: str | None = None
    result_path: str | None = None
    duration: str | None = None
    total_requests: int | None = None
    success_rate: float | None = None
    avg_latency: float | None = None
    p95_latency: float | None = None
    avg_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    max_latency_ms: float | None = None
    overall_error_rate: float | None = None
    total_errors: int | None = None
    best_client: str | None = None
    performance_scores: dict[str, float] | None = None
    clients: list[str] | None = None
    methods: list[str] | None = None
    tags: list[str] | None = None
    is_baseline: bool | None = None
    baseline_name: str | None = None
    clients_count: int | None = None
    endpoints_count: int | None = None
    target_rps: int | None = None
    start_time: Timestamp | None = None
    end_time: Timestamp | None = None
    created_at: Timestamp | None = None
    notes: str | None = None
    full_results: Any = None


@dataclasses.dataclass
class Regression:
    """A performance regression the runner detected against a baseline run (its JSON
    names); every field but ``id`` may be missing, as in :class:`HistoricRun`."""

    id: str
    run_id: str | None = None
    baseline_run_id: str | None = None
    client: str | None = None
    metric: str | None = None
    method: str | None = None
    baseline_value: float | None = None
    current_value: float | None = None
    percent_change: float | None = None
    absolute_change: float | None = None
    severity: str | None = None
    is_significant: bool | None = None
    p_value: float | None = None
    detected_at: Timestamp | None = None
    notes: str | None = None
    acknowledged_at: Timestamp | None = None
    acknowledged_by: str | None = None


class PayloadError(ValueError):
    """A runner's record that does not fit its type: an unknown key or a value of the
    wrong kind.

    Attributes:
        field: The key at fault, as ``<record>.<key>`` (``run.p95_latency_ms``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_Record = TypeVar("_Record", HistoricRun, Regression)

# What each kind of field accepts besides null, and how an error names it.
_KINDS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    str: (lambda value: isinstance(value, str), "a string"),
    float: (
        lambda value: (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ),
        "a finite number",
    ),
    int: (lambda value: isinstance(value, int) and not isinstance(value, bool), "an integer"),
    bool: (lambda value: isinstance(value, bool), "true or false"),
    list[str]: (
        lambda value: isinstance(value, list) and all(isinstance(item, str) for item in value),
        "a list of strings",
    ),
    dict[str, float]: (
        lambda value: (
            isinstance(value, dict) and all(_KINDS[float][0](item) for item in value.values())
        ),
        "an object of numbers",
    ),
    Timestamp: (lambda value: isinstance(value, str | datetime), "a timestamp string"),
}


def _field_kinds(record_type: type[Any]) -> dict[str, tuple[Callable[[Any], bool], str] | None]:
    """Each field's check (None: any JSON value), from its annotation ``<kind> | None``."""
    hints = typing.get_type_hints(record_type)
    kinds: dict[str, tuple[Callable[[Any], bool], str] | None] = {}
    for field in dataclasses.fields(record_type):
        hint = hints[field.name]
        if field.name == "id" or hint is Any:
            kinds[field.name] = _KINDS[str] if field.name == "id" else None
            continue
        parts = [part for part in typing.get_args(hint) if part is not type(None)]
        kind: Any = parts[0] if len(parts) == 1 else typing.Union[tuple(parts)]  # noqa: UP007
        kinds[field.name] = _KINDS[kind]
    return kinds


_FIELDS: dict[type[Any], dict[str, tuple[Callable[[Any], bool], str] | None]] = {
    HistoricRun: _field_kinds(HistoricRun),
    Regression: _field_kinds(Regression),
}


def _coerce(record_type: type[_Record], value: _Record | Mapping[str, Any], name: str) -> _Record:
    """The dataclass itself, or one made of a mapping with its JSON keys.

    Raises:
        TypeError: ``value`` is neither.
        PayloadError: The mapping has no non-empty string ``id``, a key the record does not
            have (named, with the closest known key), or a value of the wrong kind.
    """
    if isinstance(value, record_type):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a {record_type.__name__} or a mapping, got {value!r}")
    fields = _FIELDS[record_type]
    if not isinstance(value.get("id"), str) or not value["id"]:
        raise PayloadError(f"{name}.id", f'{name} needs an "id", a non-empty string')
    for key, item in value.items():
        if key not in fields:
            raise PayloadError(
                f"{name}.{key}",
                f"{name}.{key} is not a field of the runner's {record_type.__name__}"
                + did_you_mean(str(key), fields),
            )
        kind = fields[key]
        if item is not None and kind is not None and not kind[0](item):
            raise PayloadError(f"{name}.{key}", f"{name}.{key} must be {kind[1]} or null")
    return record_type(**value)


def _topics(message_type: MessageType, run_id: str | None, test_name: str | None) -> list[str]:
    topics = [str(message_type)]
    if run_id:
        topics.append(f"run:{run_id}")
    if test_name:
        topics.append(f"test:{test_name}")
    return topics


def new_run_event(run: HistoricRun | Mapping[str, Any], *, event_format: str = "wshub") -> Event:
    """``new_run``: a run finished and was stored; in the json-bench format, the whole run."""
    run = _coerce(HistoricRun, run, "run")
    topics = _topics(MessageType.NEW_RUN, run.id, run.test_name)
    if event_format == "json-bench":
        data = dataclasses.asdict(run)
        for key in _JSON_BENCH_OPTIONAL:  # absent rather than null, as its type has them
            if data[key] is None:
                del data[key]
        return Event(data, topics)
    data = {
        "run_id": run.id,
        "test_name": run.test_name,
        "timestamp": run.timestamp,
        "git_commit": run.git_commit,
        "status": "completed",
        "summary": {
            "total_requests": run.total_requests,
            "total_errors": run.total_errors,
            "overall_error_rate": run.overall_error_rate,
            "avg_latency_ms": run.avg_latency_ms,
            "p95_latency_ms": run.p95_latency_ms,
            "best_client": run.best_client,
            "performance_scores": run.performance_scores,
        },
    }
    return Event(data, topics)


# The keys json-bench's dashboard declares optional (`baseline_name?`): left out when not
# given. Every other key of a run is there, null when the runner did not give it.
_JSON_BENCH_OPTIONAL: Final = ("baseline_name", "notes", "full_results")

# The runner grades regressions low to critical; json-bench's dashboard knows three grades.
_JSON_BENCH_SEVERITY: Final = {
    "low": "minor",
    "minor": "minor",
    "medium": "major",
    "high": "major",
    "major": "major",
    "critical": "critical",
}


def _json_bench_regression(regression: Regression, run_id: str) -> dict[str, Any]:
    """The dashboard's ``Regression``: every key it reads, or a PayloadError naming the
    runner's key that is missing (the dashboard formats each one, and would fail on null)."""
    data: dict[str, Any] = {"runId": run_id}
    for key, source in (
        ("baselineId", "baseline_run_id"),
        ("metricName", "metric"),
        ("baselineValue", "baseline_value"),
        ("currentValue", "current_value"),
        ("percentChange", "percent_change"),
    ):
        value = getattr(regression, source)
        if value is None or value == "":
            raise PayloadError(
                f"regression.{source}",
                f"regression.{source} is required with event_format json-bench: its "
                f"dashboard shows it as {key}",
            )
        data[key] = value
    severity = _JSON_BENCH_SEVERITY.get(str(regression.severity).lower())
    if severity is None:
        raise PayloadError(
            "regression.severity",
            "regression.severity must be one of low, medium, high, critical with "
            f"event_format json-bench, got {regression.severity!r}",
        )
    data["severity"] = severity
    return data


def regression_event(
    regression: Regression | Mapping[str, Any],
    run: HistoricRun | Mapping[str, Any],
    *,
    event_format: str = "wshub",
) -> Event:
    """``regression_detected``: ``regression`` was found in ``run``."""
    regression = _coerce(Regression, regression, "regression")
    run = _coerce(HistoricRun, run, "run")
    run_id = regression.run_id or run.id
    topics = _topics(MessageType.REGRESSION_DETECTED, run_id, run.test_name)
    if event_format == "json-bench":
        return Event(_json_bench_regression(regression, run_id), topics)
    data = {
        "regression_id": regression.id,
        "run_id": run_id,
        "baseline_run_id": regression.baseline_run_id,
        "client": regression.client,
        "metric": regression.metric,
        "method": regression.method,
        "severity": regression.severity,
        "percent_change": regression.percent_change,
        "absolute_change": regression.absolute_change,
        "baseline_value": regression.baseline_value,
        "current_value": regression.current_value,
        "is_significant": regression.is_significant,
        "p_value": regression.p_value,
        "detected_at": regression.detected_at,
        "test_name": run.test_name,
        "run_info": {
            "test_name": run.test_name,
            "git_commit": run.git_commit,
            "timestamp": run.timestamp,
        },
    }
    return Event(data, topics)


#: What can happen to a baseline (``baseline_updated``'s ``action``).
BASELINE_ACTIONS: Final = ("created", "updated", "deleted")


def baseline_updated_event(
    baseline_name: str,
    run_id: str,
    test_name: str,
    action: str = "updated",
    *,
    event_format: str = "wshub",
) -> Event:
    """``baseline_updated``: the baseline ``baseline_name`` was created, moved to ``run_id``
    (``"updated"``) or deleted."""
    if action not in BASELINE_ACTIONS:
        raise PayloadError(
            "action", f"action must be one of {', '.join(BASELINE_ACTIONS)}, got {action!r}"
        )
    topics = _topics(MessageType.BASELINE_UPDATED, run_id, test_name)
    if event_format == "json-bench":
        return Event({"runId": run_id, "baselineName": baseline_name, "action": action}, topics)
    data = {
        "baseline_name": baseline_name,
        "run_id": run_id,
        "test_name": test_name,
        "action": action,
        "updated_at": MessageClock.now(),
    }
    return Event(data, topics)


def analysis_complete_event(run_id: str, test_name: str, analysis_results: Any) -> Event:
    """``analysis_complete``: the analysis of a run finished with ``analysis_results``."""
    data = {
        "run_id": run_id,
        "test_name": test_name,
        "analysis_results": analysis_results,
        "completed_at": MessageClock.now(),
    }
    return Event(data, _topics(MessageType.ANALYSIS_COMPLETE, run_id, test_name))


def run_started_event(
    run_id: str,
    test_name: str,
    *,
    git_commit: str | None = None,
    git_branch: str | None = None,
    clients: list[str] | None = None,
    methods: list[str] | None = None,
    planned_requests: int | None = None,
    started_at: Timestamp | None = None,
) -> Event:
    """``run_started``: a benchmark run began, at ``started_at`` (now unless given: a runner
    that announces a run late, or again, gives its real start)."""
    data = {
        "run_id": run_id,
        "test_name": test_name,
        "started_at": MessageClock.now() if started_at is None else started_at,
        "git_commit": git_commit,
        "git_branch": git_branch,
        "clients": clients or [],
        "methods": methods or [],
        "planned_requests": planned_requests,
    }
    return Event(data, _topics(MessageType.RUN_STARTED, run_id, test_name), run_key(run_id))


def run_progress_event(
    run_id: str,
    test_name: str,
    progress: float,
    *,
    elapsed_s: float,
    requests_done: int,
    current_rps: float,
    error_rate: float,
) -> Event:
    """``run_progress``: how far a running benchmark has come; ``progress`` is 0 to 1."""
    if (
        isinstance(progress, bool)
        or not isinstance(progress, int | float)
        or not (math.isfinite(progress) and 0.0 <= progress <= 1.0)
    ):
        raise ValueError(f"progress must be a number from 0 to 1, got {progress!r}")
    data = {
        "run_id": run_id,
        "test_name": test_name,
        "progress": progress,
        "elapsed_s": elapsed_s,
        "requests_done": requests_done,
        "current_rps": current_rps,
        "error_rate": error_rate,
    }
    return Event(data, _topics(MessageType.RUN_PROGRESS, run_id, test_name), run_key(run_id))


def run_complete_event(
    run_id: str,
    test_name: str,
    *,
    duration_s: float | None = None,
    total_requests: int | None = None,
    total_errors: int | None = None,
    error_rate: float | None = None,
) -> Event:
    """``run_complete``: a benchmark run finished; ``new_run`` follows once it is stored."""
    data = {
        "run_id": run_id,
        "test_name": test_name,
        "completed_at": MessageClock.now(),
        "duration_s": duration_s,
        "total_requests": total_requests,
        "total_errors": total_errors,
        "error_rate": error_rate,
    }
    return Event(data, _topics(MessageType.RUN_COMPLETE, run_id, test_name), run_key(run_id))


def run_failed_event(
    run_id: str, test_name: str, error: str, *, elapsed_s: float | None = None
) -> Event:
    """``run_failed``: a benchmark run stopped with ``error``."""
    data = {
        "run_id": run_id,
        "test_name": test_name,
        "error": error,
        "failed_at": MessageClock.now(),
        "elapsed_s": elapsed_s,
    }
    return Event(data, _topics(MessageType.RUN_FAILED, run_id, test_name), run_key(run_id))


#: The builder of each runner event, by type. Its parameters but ``event_format`` are the
#: keys of the event's ``POST /api/notify/<type>`` body.
EVENT_BUILDERS: Final[Mapping[str, Callable[..., Event]]] = {
    MessageType.NEW_RUN: new_run_event,
    MessageType.REGRESSION_DETECTED: regression_event,
    MessageType.BASELINE_UPDATED: baseline_updated_event,
    MessageType.ANALYSIS_COMPLETE: analysis_complete_event,
    MessageType.RUN_STARTED: run_started_event,
    MessageType.RUN_PROGRESS: run_progress_event,
    MessageType.RUN_COMPLETE: run_complete_event,
    MessageType.RUN_FAILED: run_failed_event,
}


class RunnerNotifications(abc.ABC):
    """The ``notify_*`` methods of :class:`wshub.Hub`: each builds one runner event and
    publishes it with ``broadcast_to_subscribers`` to its topics."""

    @abc.abstractmethod
    def broadcast_to_subscribers(
        self,
        message_type: str,
        data: Any,
        topics: Iterable[str] | str,
        *,
        key: str | None = None,
    ) -> int:
        """Queue a message for every client subscribed to one of ``topics`` (the hub's)."""

    @property
    @abc.abstractmethod
    def event_format(self) -> str:
        """The hub's ``event_format``: ``"wshub"`` or ``"json-bench"``."""

    def _notify(self, message_type: MessageType, event: Event) -> int:
        return self.broadcast_to_subscribers(message_type, event.data, event.topics, key=event.key)

    def notify_new_run(self, run: HistoricRun | Mapping[str, Any]) -> int:
        """Announce a finished, stored run (``new_run``). Returns the recipient count."""
        return self._notify(
            MessageType.NEW_RUN, new_run_event(run, event_format=self.event_format)
        )

    def notify_regression(
        self, regression: Regression | Mapping[str, Any], run: HistoricRun | Mapping[str, Any]
    ) -> int:
        """Announce a regression found in ``run`` (``regression_detected``)."""
        return self._notify(
            MessageType.REGRESSION_DETECTED,
            regression_event(regression, run, event_format=self.event_format),
        )

    def notify_baseline_updated(
        self, baseline_name: str, run_id: str, test_name: str, action: str = "updated"
    ) -> int:
        """Announce that the baseline ``baseline_name`` was created, moved to ``run_id``
        (``"updated"``) or deleted."""
        return self._notify(
            MessageType.BASELINE_UPDATED,
            baseline_updated_event(
                baseline_name, run_id, test_name, action, event_format=self.event_format
            ),
        )

    def notify_analysis_complete(self, run_id: str, test_name: str, analysis_results: Any) -> int:
        """Announce the results of a run's analysis (``analysis_complete``)."""
        return self._notify(
            MessageType.ANALYSIS_COMPLETE,
            analysis_complete_event(run_id, test_name, analysis_results),
        )

    def notify_run_started(self, run_id: str, test_name: str, **details: Any) -> int:
        """Announce a run that began (``run_started``); see :func:`run_started_event`."""
        return self._notify(
            MessageType.RUN_STARTED, run_started_event(run_id, test_name, **details)
        )

    def notify_run_progress(
        self, run_id: str, test_name: str, progress: float, **details: Any
    ) -> int:
        """Announce a running benchmark's progress, 0 to 1 (``run_progress``)."""
        return self._notify(
            MessageType.RUN_PROGRESS, run_progress_event(run_id, test_name, progress, **details)
        )

    def notify_run_complete(self, run_id: str, test_name: str, **details: Any) -> int:
        """Announce that a run finished (``run_complete``)."""
        return self._notify(
            MessageType.RUN_COMPLETE, run_complete_event(run_id, test_name, **details)
        )

    def notify_run_failed(self, run_id: str, test_name: str, error: str, **details: Any) -> int:
        """Announce that a run failed with ``error`` (``run_failed``)."""
        return self._notify(
            MessageType.RUN_FAILED, run_failed_event(run_id, test_name, error, **details)
        )
