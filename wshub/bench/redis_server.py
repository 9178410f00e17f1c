"""The Redis that joins the benchmark's hub nodes (``--nodes``).

Unless ``--redis-url`` names one, the benchmark runs its own ``redis-server`` on a free port
of 127.0.0.1, with its files in a temporary directory and persistence off (``--save ""
--appendonly no``): a round's messages need to live only as long as the round, and a disk
write per message would measure the disk. Its CPU time is read from ``/proc`` so that a
round can count what Redis spent alongside what the nodes spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

__all__ = [
    "BenchRedis",
    "RedisUnavailable",
    "check_redis",
    "delete_stream",
    "find_redis_server",
    "process_cpu_seconds",
    "safe_url",
    "start_redis",
]

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LAUNCH_ATTEMPTS = 5
ADDRESS_IN_USE = "Address already in use"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class RedisUnavailable(RuntimeError):
    """No Redis to join the nodes: it could not be started, or the given one does not answer."""


def find_redis_server() -> str | None:
    """The path of ``redis-server``, or None when it is not on the PATH."""
    return shutil.which("redis-server")


def safe_url(url: str) -> str:
    """``url`` without a password, for messages and the JSON report."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def process_cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``, all its threads (Linux ``/proc``).

    ``schedstat`` counts nanoseconds; ``stat`` counts clock ticks (10 ms), too coarse for a
    short round, and is only the fallback for kernels without scheduler statistics.
    """
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as stat:
        # The command name in parentheses may hold spaces; the fields after it do not.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.25) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class BenchRedis:
    """A throwaway ``redis-server`` on a free port of 127.0.0.1.

    Raises:
        RedisUnavailable: ``redis-server`` is not on the PATH.
    """

    def __init__(self) -> None:
        binary = find_redis_server()
        if binary is None:
            raise RedisUnavailable(
                "--nodes needs redis-server on the PATH (apt-get install redis-server), "
                "or --redis-url of a running Redis 7"
            )
        self.binary = binary
        self.directory = Path(tempfile.mkdtemp(prefix="wshub-bench-redis-"))
        self.log_path = self.directory / "redis-server.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Launch it and return once it answers PING; another port if the first was taken.

        Raises:
            RedisUnavailable: It exited or stayed silent; the message ends with its log.
        """
        for _ in range(LAUNCH_ATTEMPTS):
            self.port = _free_port()
            if self._launch():
                return
        raise RedisUnavailable(f"redis-server found no free port\n{self._log_tail()}")

    def _launch(self) -> bool:
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        # Only this launch's part of the log tells why it exited.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                with self.log_path.open("rb") as log:
                    log.seek(offset)
                    if ADDRESS_IN_USE.encode() in log.read():
                        return False
                raise RedisUnavailable(f"redis-server exited at start\n{self._log_tail()}")
            if _answers(self.port):
                return True
            time.sleep(0.01)
        self.process.kill()
        self.process.wait()
        self.process = None
        raise RedisUnavailable(
            f"redis-server did not answer within {START_TIMEOUT:g} s\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Shut it down and remove its directory."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            lines = []
        return "\n".join(lines) or f"(nothing in {self.log_path})"


async def check_redis(url: str) -> None:
    """Fail early, and clearly, when the Redis at ``url`` cannot join the nodes.

    Raises:
        RedisUnavailable: redis-py is missing, or Redis does not answer or is older than 7.
    """
    try:
        from redis.asyncio import Redis
    except ImportError:
        raise RedisUnavailable('--nodes needs redis-py: pip install "wshub[redis]"') from None
    client = Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        info = await client.info("server")
    except Exception as exc:  # redis-py's errors, OSError and timeouts alike
        raise RedisUnavailable(f"Redis at {safe_url(url)} does not answer: {exc}") from None
    finally:
        await client.aclose()
    # The backplane reads max-deleted-entry-id from XINFO STREAM, which Redis 7 added.
    major = int(str(info.get("redis_version", "0")).partition(".")[0] or 0)
    if major < 7:
        raise RedisUnavailable(
            f"Redis at {safe_url(url)} is {info.get('redis_version')}; the nodes need 7 or newer"
        )


async def delete_stream(url: str, stream: str) -> None:
    """Remove a round's stream, so that a shared Redis keeps nothing of the benchmark."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        with contextlib.suppress(Exception):
            await client.delete(stream)
    finally:
        await client.aclose()


async def start_redis() -> BenchRedis:
    """A started :class:`BenchRedis`, launched off the event loop.

    Raises:
        RedisUnavailable: See :class:`BenchRedis`.
    """
    server = BenchRedis()
    try:
        await asyncio.to_thread(server.start)
    except BaseException:
        server.stop()
        raise
    return server
