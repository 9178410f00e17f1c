"""Picks the fan-out core: the compiled ``_fanout`` module, or its pure-Python twin.

The compiled core is used when it was built, the interpreter is CPython and
``WSHUB_NO_EXTENSIONS`` is unset (or empty, or 0). Type checkers always see the typed Python
twin, which is the specification the compiled module mirrors.
"""

from __future__ import annotations

import importlib
import os
import platform
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from . import _fanout_py

__all__ = ["IMPLEMENTATION", "Implementation", "core_module"]

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
