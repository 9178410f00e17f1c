"""Picks the fan-out core (the compiled ``_fanout`` module, or its pure-Python twin) and
frames messages with it.

The compiled core is used when it was built, the interpreter is CPython and
``WSHUB_NO_EXTENSIONS`` is unset (or empty, or 0). Type checkers always see the typed Python
twin, which is the specification the compiled module mirrors.
"""

from __future__ import annotations

import importlib
import os
import platform
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import orjson

from . import _fanout_py
from .wire import JSON_OPTIONS, MessageClock, rfc3339

__all__ = ["IMPLEMENTATION", "Framer", "Implementation", "core_module", "encode_data"]

Implementation = Literal["cython", "python"]

_compiled: ModuleType | None = None
if not TYPE_CHECKING:
    _extensions_disabled = os.environ.get("WSHUB_NO_EXTENSIONS", "") not in {"", "0"}
    if not _extensions_disabled and platform.python_implementation() == "CPython":
        try:
            from . import _fanout as _compiled
        except ImportError:
            _compiled = None

IMPLEMENTATION: Implementation = "cython" if _compiled is not None else "python"
"""Which core ``Hub`` uses by default: ``"cython"`` or ``"python"``."""


def core_module(implementation: Implementation | None = None) -> ModuleType:
    """Return the fan-out core module for ``implementation`` (None: the default).

    Raises:
        ValueError: ``implementation`` is not ``"cython"`` or ``"python"``.
        ImportError: ``"cython"`` was asked for but the extension is not available.
    """
    if implementation is None:
        implementation = IMPLEMENTATION
    if implementation == "python":
        return _fanout_py
    if implementation == "cython":
        if _compiled is not None:
            return _compiled
        # Import again to raise the ImportError that says why the extension is missing.
        return importlib.import_module("wshub._fanout")
    raise ValueError(f"implementation must be 'cython' or 'python', got {implementation!r}")


class Framer:
    """Serializes and frames messages with one core: every message the hub sends is made here.

    Args:
        core: The fan-out core module (:func:`core_module`).
    """

    def __init__(self, core: ModuleType) -> None:
        self._core = core
        self._timestamp_ms = -1
        self._timestamp = ""

    def reply(
        self,
        message_type: str,
        data: Any = None,
        *,
        client_id: str | None = None,
        error: Any = None,
    ) -> Any:
        """A message without an id: a direct reply, or the shutdown ``disconnection``."""
        core = self._core
        payload = core.encode_envelope(
            message_type, data, MessageClock.now(), None, client_id, error
        )
        return core.Message(payload, None, message_type)

    def published(
        self,
        message_type: str,
        data: Any,
        message_id: str,
        timestamp: str,
        key: str | None = None,
    ) -> Any:
        """A published message; ``data`` is serialized here (TypeError if it cannot be).
        ``key``, its conflation key, is in the envelope and on the core's message."""
        core = self._core
        payload = core.encode_envelope(message_type, data, timestamp, message_id, key=key)
        return core.Message(payload, key, message_type, message_id)

    def stored(
        self, message_type: str, data: bytes | None, message_id: str, key: str | None = None
    ) -> Any:
        """A message read from a backplane, around its ``data`` serialized by the publisher;
        its timestamp is the id's milliseconds."""
        ms = int(message_id.partition("-")[0])
        if ms != self._timestamp_ms:  # one strftime per millisecond, not per message
            self._timestamp_ms = ms
            self._timestamp = rfc3339(ms * 1_000_000)
        core = self._core
        fragment = orjson.Fragment(data) if data is not None else None
        payload = core.encode_envelope(
            message_type, fragment, self._timestamp, message_id, key=key
        )
        return core.Message(payload, key, message_type, message_id)


def encode_data(data: Any) -> bytes | None:
    """The ``data`` of a message as JSON, for a backplane: serialized once, by the publisher.

    None stays None, so the envelope has no ``data``, as a hub alone sends it.

    Raises:
        TypeError: orjson cannot serialize ``data`` (its JSONEncodeError is a TypeError).
    """
    return orjson.dumps(data, option=JSON_OPTIONS) if data is not None else None
