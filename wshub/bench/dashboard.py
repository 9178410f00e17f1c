"""The dashboard workload: many dashboards, some of them slow, under each slow-client policy.

What a runner's hub sees in production: ``runs`` benchmark runs report their progress on a
tick (one keyed ``run_progress`` per run per tick, in one loop iteration, so the hub writes
each client once per tick), and now and then a regression is detected (an unkeyed
``regression_detected``, numbered). A fraction of the clients read slowly: each takes at most
``slow_rate`` frames a second off a small receive buffer and decodes every frame it takes
(type, key, ``sent_at``), as a page does; the others read as fast as they can and sample the
publish-to-receive latency of the oldest frame in each chunk.

Each policy (``conflate``, ``disconnect``, ``drop_oldest``) gets a round of its own with the
same clients and the same schedule, in a fresh hub process: the Cython core behind the lean
server, the hub's defaults but for the policy, and a small ``socket_send_buffer``
(:data:`SEND_BUFFER`), so that what a slow client cannot take waits in the hub, where a
policy can act on it, rather than in kernel buffers. A round reports:

- the fast clients' p50/p99 latency;
- the slow clients' staleness: sampled every :data:`SAMPLE_EVERY` seconds while the runs
  publish, the age of the newest progress each holds (a client that was disconnected keeps
  what it had, and ages);
- the hub's RSS at its peak during the round, and its CPU time;
- proof of the events: how many clients hold every ``regression_detected`` (each counted by
  its number, once), how many were closed by the hub, and the hub's own counts of
  conflated and dropped messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import multiprocessing
import socket
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import orjson

import wshub

from .channel import Channel
from .client import (
    OPCODE_CLOSE,
    OPCODE_PING,
    OPCODE_TEXT,
    HandshakeReader,
    frame_at,
    handshake_request,
    raise_open_files_limit,
)
from .host import rss_bytes
from .runner import percentile

__all__ = ["POLICIES", "DashboardPlan", "DashboardRound", "dashboard_table", "run_dashboard"]

POLICIES = ("conflate", "disconnect", "drop_oldest")
#: The hub's ``socket_send_buffer`` in these rounds (the kernel doubles it).
SEND_BUFFER = 8192
#: A slow client's ``SO_RCVBUF`` (the kernel doubles it too).
SLOW_RECEIVE_BUFFER = 4096
#: Bytes a slow client takes from its socket before it stops reading until it caught up.
SLOW_READ_AHEAD = 4096
#: Seconds between two steps of the slow readers, and between two staleness samples.
SLOW_STEP = 0.05
SAMPLE_EVERY = 0.25
#: Most latency or staleness samples one worker reports (a uniform subsample).
MAX_SAMPLES = 200_000
PROGRESS = b'{"type":"run_progress"'
EVENT = b'{"type":"regression_detected"'
END = b'{"type":"bench_end"'
SENT_AT = b'"sent_at":'
CONNECT_CONCURRENCY = 128


@dataclasses.dataclass(frozen=True)
class DashboardPlan:
    """What the dashboard workload measures."""

    clients: int
    slow: float  # the fraction of clients that read slowly
    policies: tuple[str, ...]
    runs: int  # keyed progress streams, one message each per tick
    tick: float  # seconds between two ticks
    event_every: int  # ticks between two regressions
    duration: float  # seconds the runs publish
    slow_rate: float  # frames per second a slow client takes
    workers: int
    sources: int
    host: str
    loop: str
    timeout: float  # longest wait, after publishing, for every client to get the end marker

    @property
    def ticks(self) -> int:
        return max(1, round(self.duration / self.tick))

    @property
    def events(self) -> int:
        return len(range(0, self.ticks, self.event_every))


@dataclasses.dataclass
class DashboardRound:
    """One policy's round."""

    policy: str
    clients: int
    connected: int
    slow_clients: int
    published: int  # messages, progress and events
    events: int
    fast_latencies_ms: list[float]
    staleness_s: list[float]
    fast_with_every_event: int
    slow_with_every_event: int
    fast_closed: int
    slow_closed: int
    hub_rss_peak_mib: float
    hub_rss_growth_mib: float
    hub_cpu_seconds: float
    conflated: int
    dropped: int
    slow_consumer_disconnects: int
    timed_out: bool

    def summary(self) -> dict[str, Any]:
        fast = self.connected - self.slow_clients
        return {
            "policy": self.policy,
            "clients": self.clients,
            "connected": self.connected,
            "slow_clients": self.slow_clients,
            "messages_published": self.published,
            "events_published": self.events,
            "fast_latency_p50_ms": _finite(percentile(self.fast_latencies_ms, 0.5)),
            "fast_latency_p99_ms": _finite(percentile(self.fast_latencies_ms, 0.99)),
            "slow_staleness_p50_s": _finite(percentile(self.staleness_s, 0.5)),
            "slow_staleness_p99_s": _finite(percentile(self.staleness_s, 0.99)),
            "fast_clients_with_every_event": f"{self.fast_with_every_event}/{fast}",
            "slow_clients_with_every_event": f"{self.slow_with_every_event}/{self.slow_clients}",
            "fast_closed": self.fast_closed,
            "slow_closed": self.slow_closed,
            "hub_rss_peak_mib": round(self.hub_rss_peak_mib, 1),
            "hub_rss_growth_mib": round(self.hub_rss_growth_mib, 1),
            "hub_cpu_s": round(self.hub_cpu_seconds, 2),
            "conflated": self.conflated,
            "dropped": self.dropped,
            "slow_consumer_disconnects": self.slow_consumer_disconnects,
            "timed_out": self.timed_out,
        }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


# The hub's side: one process per round.


def _progress(run: int, tick: int) -> dict[str, Any]:
    """One run's progress at ``tick``, about 250 bytes of JSON, stamped when it is sent."""
    return {
        "sent_at": 0.0,
        "run_id": f"run-{run:04d}",
        "test_name": f"test-{run % 7}",
        "progress": round(tick % 1000 / 1000, 3),
        "elapsed_s": round(tick * 0.2, 1),
        "requests_done": 1000 * tick,
        "current_rps": 1234.5,
        "error_rate": 0.0012,
        "note": "x" * 64,
    }


async def _host(pipe: Connection, policy: str, plan: DashboardPlan) -> None:
    channel = Channel(pipe, "the benchmark")
    config = wshub.HubConfig(
        max_clients=plan.clients + 100,
        slow_client_policy=policy,
        socket_send_buffer=SEND_BUFFER,
        log_connection_events=False,
        # Protocol pings would wake slow clients' sockets; the round is short.
        ping_interval=3600.0,
        pong_timeout=3600.0,
        # The readers decode what they take; the figures from before compression stay
        # comparable.
        compression="off",
    )
    # Closing slow clients is what some of these rounds are about: no line for each.
    logger = logging.getLogger("wshub.bench.dashboard")
    logger.setLevel(logging.ERROR)
    hub = wshub.Hub(config, logger=logger, implementation="cython")
    gc.collect()
    rss_before = rss_bytes()
    async with wshub.serve(hub, plan.host, 0) as server:
        channel.send("listening", server.sockets[0].getsockname()[1])
        _, count = await channel.expect("await_clients", timeout=600)
        async with asyncio.timeout(120):
            while hub.client_count < count:
                await asyncio.sleep(0.01)
        gc.collect()
        channel.send("ready", hub.client_count)
        await channel.expect("publish", timeout=600)
        loop = asyncio.get_running_loop()
        peak = rss_bytes()
        cpu_started = time.process_time()
        started = loop.time()
        published = events = 0
        for tick in range(plan.ticks):
            now = time.time()
            for run in range(plan.runs):
                data = _progress(run, tick)
                data["sent_at"] = now
                hub.broadcast_to_all("run_progress", data, key=f"run:{run}")
            published += plan.runs
            if tick % plan.event_every == 0:
                hub.broadcast_to_all("regression_detected", {"n": events, "sent_at": now})
                events += 1
                published += 1
            peak = max(peak, rss_bytes())
            await asyncio.sleep(max(0.0, started + (tick + 1) * plan.tick - loop.time()))
        hub.broadcast_to_all("bench_end", {"events": events})
        channel.send("published", published, events)
        # While the slow clients drain, the hub's buffers may still grow: keep the peak.
        while True:
            try:
                await channel.expect("finish", timeout=SAMPLE_EVERY)
                break
            except TimeoutError:
                peak = max(peak, rss_bytes())
        stats = hub.stats()
        channel.send(
            "finished",
            time.process_time() - cpu_started,
            peak,
            peak - rss_before,
            {
                "conflated": stats["conflated"],
                "dropped": stats["drops"],
                "slow_consumer_disconnects": stats["slow_consumer_disconnects"],
            },
        )
        await channel.expect("stop", timeout=600)
    channel.send("stopped")


def host_main(pipe: Connection, policy: str, plan: DashboardPlan) -> None:
    """Entry point of a round's hub process."""
    raise_open_files_limit()
    import uvloop

    uvloop.run(_host(pipe, policy, plan))


# The clients' side: worker processes of readers.


class DashboardReader(HandshakeReader):
    """One dashboard: fast (counts, samples latency) or slow (decodes every frame it takes,
    at most ``rate`` a second)."""

    def __init__(
        self, request: bytes, slow: bool, rate: float, opened: asyncio.Future[bool]
    ) -> None:
        super().__init__(request, opened)
        self.slow = slow
        self.rate = rate
        self.paused = False
        self.ended = False
        self.events: set[int] = set()
        self.repeated = 0
        self.newest_progress = 0.0  # sent_at of the newest run_progress taken
        self.latencies: list[float] = []
        self.allowance = 0.0  # frames a slow reader may still take this step

    def frames_arrived(self) -> None:
        if self.slow:
            if len(self.buffer) >= SLOW_READ_AHEAD and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return
        self._sample_latency()
        self.take(len(self.buffer))

    def _sample_latency(self) -> None:
        # The first frame of a chunk is the one that waited longest.
        buffer = self.buffer
        start = buffer.find(SENT_AT)
        if start < 0 or not buffer.startswith(PROGRESS, _payload_start(buffer)):
            return
        start += len(SENT_AT)
        end = buffer.find(b",", start)
        try:
            sent_at = float(buffer[start:end])
        except ValueError:
            return
        if sent_at > 0:
            self.latencies.append((time.time() - sent_at) * 1000.0)

    def step(self) -> None:
        """A slow reader's turn: take what its rate allows, then read on if it caught up."""
        # A reader that missed steps (a busy machine) catches up a little, not all at once.
        self.allowance = min(self.allowance + self.rate * SLOW_STEP, 4 * self.rate * SLOW_STEP)
        frames = int(self.allowance)
        if frames:
            self.allowance -= self.take(frames, decode=True)
        if self.paused and len(self.buffer) < SLOW_READ_AHEAD and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def take(self, limit: int, *, decode: bool = False) -> int:
        """Take at most ``limit`` whole frames off the buffer; how many were taken."""
        buffer = self.buffer
        position = 0
        taken = 0
        while taken < limit and (frame := frame_at(buffer, position)) is not None:
            opcode, start, end = frame
            if opcode == OPCODE_TEXT:
                taken += 1
                if decode or buffer.startswith(EVENT, start) or buffer.startswith(END, start):
                    self._decoded(orjson.loads(buffer[start:end]))
            elif opcode == OPCODE_PING:
                self.pong(bytes(buffer[start:end]))
            elif opcode == OPCODE_CLOSE:
                self.transport.close()
            position = end
        if position:
            del buffer[:position]
        return taken

    def _decoded(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        data = message.get("data") or {}
        if kind == "run_progress":
            self.newest_progress = max(self.newest_progress, data["sent_at"])
        elif kind == "regression_detected":
            number = data["n"]
            if number in self.events:
                self.repeated += 1
            self.events.add(number)
        elif kind == "bench_end":
            self.ended = True


def _payload_start(buffer: bytearray) -> int:
    length = buffer[1] & 0x7F if len(buffer) > 1 else 0
    return 2 if length < 126 else 4 if length == 126 else 10


def _subsample(samples: list[float]) -> list[float]:
    if len(samples) <= MAX_SAMPLES:
        return samples
    step = len(samples) / MAX_SAMPLES
    return [samples[int(index * step)] for index in range(MAX_SAMPLES)]


async def _open(
    host: str, port: int, source: str, slow: bool, rate: float
) -> DashboardReader | None:
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[bool] = loop.create_future()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if slow:
            # Before connecting, so that the window the client offers is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RECEIVE_BUFFER)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        request = handshake_request(host, port, "/api/ws")
        _, reader = await loop.create_connection(
            lambda: DashboardReader(request, slow, rate, opened), sock=sock
        )
        if not await asyncio.wait_for(opened, 60):
            return None
    except (OSError, TimeoutError):
        sock.close()
        return None
    return reader


class _Dashboards:
    """The readers of one worker process and the commands that drive them."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.readers: list[DashboardReader] = []

    async def connect(
        self, host: str, port: int, slow: list[bool], sources: list[str], rate: float
    ) -> None:
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(index: int) -> DashboardReader | None:
            async with limit:
                source = sources[index % len(sources)]
                return await _open(host, port, source, slow[index], rate)

        results = await asyncio.gather(*(one(index) for index in range(len(slow))))
        self.readers = [reader for reader in results if reader is not None]
        self.channel.send("connected", len(self.readers))

    async def run(self, timeout: float, events: int) -> None:
        """Step the slow readers until every reader has the end marker or was closed (or
        ``timeout`` after the runs stopped), sampling staleness while they publish."""
        readers = self.readers
        slow = [reader for reader in readers if reader.slow]
        staleness: list[float] = []
        started = time.time()
        next_sample = started
        published = asyncio.ensure_future(self.channel.expect("published", timeout=3600))
        give_up_at = math.inf
        try:
            while not all(reader.ended or reader.closed for reader in readers):
                for reader in slow:
                    if not reader.closed:
                        reader.step()
                now = time.time()
                if not published.done() and now >= next_sample:
                    next_sample += SAMPLE_EVERY
                    staleness.extend(now - (reader.newest_progress or started) for reader in slow)
                elif published.done() and give_up_at == math.inf:
                    give_up_at = time.monotonic() + timeout
                if time.monotonic() > give_up_at:
                    break
                await asyncio.sleep(SLOW_STEP)
            # Every reader may have its end marker before the benchmark passes "published"
            # on; taken here, it cannot be read later as the worker's next command.
            await published
        finally:
            published.cancel()
        fast = [reader for reader in readers if not reader.slow]
        every = set(range(events))
        self.channel.send(
            "report",
            {
                "fast_latencies_ms": _subsample([s for r in fast for s in r.latencies]),
                "staleness_s": _subsample(staleness),
                "slow": len(slow),
                "fast_with_every_event": sum(r.events == every for r in fast),
                "slow_with_every_event": sum(r.events == every for r in slow),
                "repeated": sum(r.repeated for r in readers),
                # The readers never close first: a connection that ended before the end
                # marker was closed by the hub (4008), or aborted when it would not drain.
                "fast_closed": sum(r.closed and not r.ended for r in fast),
                "slow_closed": sum(r.closed and not r.ended for r in slow),
                "unfinished": sum(not (r.ended or r.closed) for r in readers),
            },
        )

    def close(self) -> None:
        for reader in self.readers:
            if not reader.closed:
                reader.transport.abort()
        self.readers = []


async def _worker(pipe: Connection) -> None:
    channel = Channel(pipe, "the benchmark")
    dashboards = _Dashboards(channel)
    while True:
        command = await channel.next()
        kind = command[0]
        if kind == "connect":
            await dashboards.connect(*command[1:])
        elif kind == "run":
            await dashboards.run(*command[1:])
        elif kind == "close":
            dashboards.close()
            channel.send("closed")
        else:  # "exit", or "gone": the benchmark went away
            dashboards.close()
            return


def worker_main(pipe: Connection) -> None:
    """Entry point of a worker process of dashboards."""
    raise_open_files_limit()
    import uvloop

    uvloop.run(_worker(pipe))


# The benchmark's side: a round per policy.


def _spawn(
    context: Any, target: Callable[..., None], name: str, *args: Any
) -> tuple[Channel, Any]:
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    child.close()
    return Channel(parent, name), process


async def _stop(channel: Channel, process: Any, reply: str) -> None:
    with contextlib.suppress(OSError):
        channel.send("stop" if reply == "stopped" else "exit")
    with contextlib.suppress(Exception):
        await channel.expect(reply, timeout=60)
    await asyncio.to_thread(process.join, 10)
    if process.is_alive():
        process.kill()


def slow_flags(plan: DashboardPlan) -> list[bool]:
    """Which clients read slowly: every ``1/slow``-th, spread evenly."""
    every = round(1 / plan.slow) if plan.slow > 0 else 0
    return [bool(every) and index % every == every - 1 for index in range(plan.clients)]


async def run_dashboard(
    plan: DashboardPlan, progress: Callable[[int, int, str], None]
) -> list[DashboardRound]:
    """One round per policy, with the same clients' worker processes throughout."""
    raise_open_files_limit()
    context = multiprocessing.get_context("spawn")
    workers = [
        _spawn(context, worker_main, f"dashboard worker {index}") for index in range(plan.workers)
    ]
    rounds = []
    try:
        for done, policy in enumerate(plan.policies, 1):
            progress(done, len(plan.policies), f"dashboard N={plan.clients:,} {policy}")
            rounds.append(await _round(context, [w for w, _ in workers], policy, plan))
    finally:
        for channel, process in workers:
            await _stop(channel, process, "gone")
    return rounds


async def _round(
    context: Any, workers: list[Channel], policy: str, plan: DashboardPlan
) -> DashboardRound:
    host, process = _spawn(context, host_main, f"{policy} hub", policy, plan)
    try:
        _, port = await host.expect("listening", timeout=120)
        flags = slow_flags(plan)
        sources = [f"127.0.0.{2 + index}" for index in range(plan.sources)]
        for index, worker in enumerate(workers):
            share = flags[index :: len(workers)]
            worker.send("connect", plan.host, port, share, sources, plan.slow_rate)
        connected = sum(reply[1] for reply in await _all(workers, "connected", 600))
        if connected < plan.clients:
            print(
                f"warning: {plan.clients - connected} of {plan.clients} clients failed to connect",
                file=sys.stderr,
            )
        host.send("await_clients", connected)
        await host.expect("ready", timeout=180)
        for worker in workers:
            worker.send("run", plan.timeout, plan.events)
        host.send("publish")
        _, published, events = await host.expect("published", timeout=plan.duration * 4 + 120)
        for worker in workers:
            worker.send("published")
        reports = [reply[1] for reply in await _all(workers, "report", plan.timeout + 120)]
        host.send("finish")
        _, cpu, peak, growth, counts = await host.expect("finished", timeout=60)
        for worker in workers:
            worker.send("close")
        await _all(workers, "closed", 60)
    finally:
        await _stop(host, process, "stopped")
    repeated = sum(report["repeated"] for report in reports)
    if repeated:
        print(f"warning: {policy}: {repeated} events arrived twice", file=sys.stderr)
    mib = 2**20
    return DashboardRound(
        policy=policy,
        clients=plan.clients,
        connected=connected,
        slow_clients=sum(report["slow"] for report in reports),
        published=published,
        events=events,
        fast_latencies_ms=[s for report in reports for s in report["fast_latencies_ms"]],
        staleness_s=[s for report in reports for s in report["staleness_s"]],
        fast_with_every_event=sum(report["fast_with_every_event"] for report in reports),
        slow_with_every_event=sum(report["slow_with_every_event"] for report in reports),
        fast_closed=sum(report["fast_closed"] for report in reports),
        slow_closed=sum(report["slow_closed"] for report in reports),
        hub_rss_peak_mib=peak / mib,
        hub_rss_growth_mib=growth / mib,
        hub_cpu_seconds=cpu,
        conflated=counts["conflated"],
        dropped=counts["dropped"],
        slow_consumer_disconnects=counts["slow_consumer_disconnects"],
        timed_out=sum(report["unfinished"] for report in reports) > 0,
    )


async def _all(channels: Sequence[Channel], kind: str, timeout: float) -> list[tuple[Any, ...]]:
    return list(await asyncio.gather(*(channel.expect(kind, timeout) for channel in channels)))


COLUMNS = (
    ("policy", "policy"),
    ("fast p50 ms", "fast_latency_p50_ms"),
    ("fast p99 ms", "fast_latency_p99_ms"),
    ("slow stale p50 s", "slow_staleness_p50_s"),
    ("slow stale p99 s", "slow_staleness_p99_s"),
    ("fast: every event", "fast_clients_with_every_event"),
    ("slow: every event", "slow_clients_with_every_event"),
    ("slow cut off", "slow_closed"),
    ("4008s", "slow_consumer_disconnects"),
    ("conflated", "conflated"),
    ("dropped", "dropped"),
    ("RSS peak MiB", "hub_rss_peak_mib"),
    ("hub CPU s", "hub_cpu_s"),
)


def dashboard_table(rounds: Sequence[DashboardRound]) -> str:
    """The rounds as a text table, one row per policy."""
    rows = [[str(name) for name, _ in COLUMNS]]
    for result in rounds:
        summary = result.summary()
        rows.append(["n/a" if summary[key] is None else str(summary[key]) for _, key in COLUMNS])
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    )
