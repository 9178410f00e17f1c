"""What ``pip install .`` ships: every subpackage, not only what an editable install sees."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_included_in_a_wheel() -> None:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = settings["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "wshub").rglob("__init__.py")
    ]
    assert "wshub.bench" in packages
    for package in packages:
        assert any(fnmatch.fnmatch(package, pattern) for pattern in patterns), package


def test_the_redis_extra_brings_the_hiredis_parser() -> None:
    # The backplane reads every message through redis-py's parser: hiredis's, in C.
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE
