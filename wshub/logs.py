"""Log lines of a standalone hub: readable text for people, one JSON object a line for machines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["JsonFormatter", "RateLimitedLog", "configure_logging", "count_of"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def count_of(count: int, noun: str) -> str:
    """``"1 client"``, ``"2 clients"``: a count as a log line says it."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "exception"?}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc(record.created)


def _utc(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + (
        f".{int(created % 1 * 1000):03d}Z"
    )


class RateLimitedLog:
    """Log lines that clients cause, at most ``lines`` per ``period`` seconds.

    Whatever clients do, they cannot fill the disk or drown the operator's logs: past the
    budget, lines are counted, not written, and the next line written says how many were
    left out.
    """

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        lines: int = 20,
        period: float = 10.0,
    ) -> None:
        self.logger = logger
        self.lines = lines
        self.period = period
        self.window_started = -period
        self.written = 0
        self.suppressed = 0

    def log(self, level: int, message: str, *args: Any, exc_info: bool = False) -> None:
        """Log one line, unless this period's budget is spent."""
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self.window_started >= self.period:
            self.window_started = now
            self.written = 0
        if self.written >= self.lines:
            self.suppressed += 1
            return
        self.written += 1
        if self.suppressed:
            message += " (%d more lines caused by clients left out)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.log(level, message, *args, exc_info=exc_info)

    def info(self, message: str, *args: Any) -> None:
        self.log(logging.INFO, message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.log(logging.WARNING, message, *args)

    def exception(self, message: str, *args: Any) -> None:
        """An ERROR line with the traceback being handled."""
        self.log(logging.ERROR, message, *args, exc_info=True)


def configure_logging(log_format: str, level: str) -> None:
    """Send every log record at ``level`` or above to stderr in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every handshake at INFO; the hub logs connections itself.
    logging.getLogger("websockets").setLevel(max(root.level, logging.WARNING))
