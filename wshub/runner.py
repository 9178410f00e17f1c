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
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from .wire import MessageClock, MessageType

__all__ = [
    "HistoricRun",
    "Regression",
    "RunnerNotifications",
    "analysis_complete_event",
    "baseline_updated_event",
    "new_run_event",
    "regression_event",
    "run_complete_event",
    "run_failed_event",
    "run_progress_event",
    "run_started_event",
]

Timestamp = datetime | str
Event = tuple[dict[str, Any], list[str]]


@dataclasses.dataclass
class HistoricRun:
    """A finished benchmark run as the runner stores it."""

    id: str
    timestamp: Timestamp | None = None
    git_commit: str = ""
    git_branch: str = ""
    test_name: str = ""
    description: str = ""
    total_requests: int = 0
    success_rate: float = 0.0
    avg_latency_ms: float = 0.0
    p95_latency_ms: float = 0.0
    p99_latency_ms: float = 0.0
    max_latency_ms: float = 0.0
    overall_error_rate: float = 0.0
    total_errors: int = 0
    best_client: str = ""
    performance_scores: dict[str, float] = dataclasses.field(default_factory=dict)
    clients: list[str] = dataclasses.field(default_factory=list)
    methods: list[str] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)
    is_baseline: bool = False
    baseline_name: str | None = None


@dataclasses.dataclass
class Regression:
    """A performance regression the runner detected against a baseline run."""

    id: str
    run_id: str = ""
    baseline_run_id: str = ""
    client: str = ""
    metric: str = ""
    method: str = ""
    baseline_value: float = 0.0
    current_value: float = 0.0
    percent_change: float = 0.0
    absolute_change: float = 0.0
    severity: str = ""
    is_significant: bool = False
    p_value: float | None = None
    detected_at: Timestamp | None = None
    notes: str = ""


_Record = TypeVar("_Record", HistoricRun, Regression)


def _coerce(record_type: type[_Record], value: _Record | Mapping[str, Any], name: str) -> _Record:
    """Accept the dataclass itself or a mapping with its JSON keys (unknown keys ignored)."""
    if isinstance(value, record_type):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a {record_type.__name__} or a mapping, got {value!r}")
    if "id" not in value:
        raise ValueError(f'{name} has no "id"')
    known = {field.name for field in dataclasses.fields(record_type)}
    return record_type(**{key: item for key, item in value.items() if key in known})


def _topics(message_type: MessageType, run_id: str | None, test_name: str | None) -> list[str]:
    topics = [str(message_type)]
    if run_id:
        topics.append(f"run:{run_id}")
    if test_name:
        topics.append(f"test:{test_name}")
    return topics


def new_run_event(run: HistoricRun | Mapping[str, Any]) -> Event:
    """``new_run``: a run finished and was stored."""
    run = _coerce(HistoricRun, run, "run")
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
    return data, _topics(MessageType.NEW_RUN, run.id, run.test_name)


def regression_event(
    regression: Regression | Mapping[str, Any], run: HistoricRun | Mapping[str, Any]
) -> Event:
    """``regression_detected``: ``regression`` was found in ``run``."""
    regression = _coerce(Regression, regression, "regression")
    run = _coerce(HistoricRun, run, "run")
    run_id = regression.run_id or run.id
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
        "run_info": {
            "test_name": run.test_name,
            "git_commit": run.git_commit,
            "timestamp": run.timestamp,
        },
    }
    return data, _topics(MessageType.REGRESSION_DETECTED, run_id, run.test_name)


def baseline_updated_event(baseline_name: str, run_id: str, test_name: str) -> Event:
    """``baseline_updated``: ``run_id`` became the baseline called ``baseline_name``."""
    data = {
        "baseline_name": baseline_name,
        "run_id": run_id,
        "test_name": test_name,
        "updated_at": MessageClock.now(),
    }
    return data, _topics(MessageType.BASELINE_UPDATED, run_id, test_name)


def analysis_complete_event(run_id: str, test_name: str, analysis_results: Any) -> Event:
    """``analysis_complete``: the analysis of a run finished with ``analysis_results``."""
    data = {
        "run_id": run_id,
        "test_name": test_name,
        "analysis_results": analysis_results,
        "completed_at": MessageClock.now(),
    }
    return data, _topics(MessageType.ANALYSIS_COMPLETE, run_id, test_name)


def run_started_event(
    run_id: str,
    test_name: str,
    *,
    git_commit: str | None = None,
    git_branch: str | None = None,
    clients: list[str] | None = None,
    methods: list[str] | None = None,
    planned_requests: int | None = None,
) -> Event:
    """``run_started``: a benchmark run began."""
    data = {
        "run_id": run_id,
        "test_name": test_name,
        "started_at": MessageClock.now(),
        "git_commit": git_commit,
        "git_branch": git_branch,
        "clients": clients or [],
        "methods": methods or [],
        "planned_requests": planned_requests,
    }
    return data, _topics(MessageType.RUN_STARTED, run_id, test_name)


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
    return data, _topics(MessageType.RUN_PROGRESS, run_id, test_name)


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
    return data, _topics(MessageType.RUN_COMPLETE, run_id, test_name)


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
    return data, _topics(MessageType.RUN_FAILED, run_id, test_name)


class RunnerNotifications(abc.ABC):
    """The ``notify_*`` methods of :class:`wshub.Hub`: each builds one runner event and
    publishes it with ``broadcast_to_subscribers`` to its topics."""

    @abc.abstractmethod
    def broadcast_to_subscribers(
        self, message_type: str, data: Any, topics: Iterable[str] | str
    ) -> int:
        """Queue a message for every client subscribed to one of ``topics`` (the hub's)."""

    def _notify(self, message_type: MessageType, event: Event) -> int:
        data, topics = event
        return self.broadcast_to_subscribers(message_type, data, topics)

    def notify_new_run(self, run: HistoricRun | Mapping[str, Any]) -> int:
        """Announce a finished, stored run (``new_run``). Returns the recipient count."""
        return self._notify(MessageType.NEW_RUN, new_run_event(run))

    def notify_regression(
        self, regression: Regression | Mapping[str, Any], run: HistoricRun | Mapping[str, Any]
    ) -> int:
        """Announce a regression found in ``run`` (``regression_detected``)."""
        return self._notify(MessageType.REGRESSION_DETECTED, regression_event(regression, run))

    def notify_baseline_updated(self, baseline_name: str, run_id: str, test_name: str) -> int:
        """Announce that ``run_id`` is now the baseline ``baseline_name``."""
        return self._notify(
            MessageType.BASELINE_UPDATED, baseline_updated_event(baseline_name, run_id, test_name)
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
