"""Runs the measurements: worker processes, servers one at a time, rounds interleaved.

For each workload and client count, every repetition runs every variant once, in an order
rotated from one repetition to the next, so slow drifts of a shared machine spread over all
variants alike. A variant's round: start its server, connect the clients, read the server's
RSS, publish the workload, wait until every reading client has every message, read the
server's CPU time, disconnect, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import statistics
import sys
from collections.abc import Callable
from typing import Any

from .channel import Channel, ChannelClosed
from .client import raise_open_files_limit, worker_main
from .host import host_main
from .workload import expected_messages, topic_of_client

__all__ = ["Plan", "RoundResult", "Runner"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure."""

    variants: tuple[str, ...]
    clients: tuple[int, ...]
    workloads: tuple[str, ...]  # "burst" and/or "stream"
    burst: int  # K: messages per loop iteration in a burst
    bursts: int  # bursts per round; 0: enough for ``deliveries``
    stream_messages: int  # messages per round of a flat-out "stream"; 0: enough for ``deliveries``
    deliveries: int  # aim of a round, in messages times clients, where not given above
    rate: float  # messages/s for "stream"; 0 = one per loop iteration, as fast as possible
    duration: float  # seconds of a fixed-rate stream round
    size: int  # bytes of each event's JSON data
    topics: int  # 0: every message to every client; T: client i follows topic i % T
    slow: float  # fraction of clients that stop reading
    repetitions: int
    workers: int
    sources: int  # 127.0.0.x source addresses the clients spread over
    host: str
    loop: str
    timeout: float  # longest wait for a round's deliveries
    flush_interval: float  # the wshub variants' HubConfig.flush_interval


@dataclasses.dataclass
class RoundResult:
    """One variant's round."""

    variant: str
    workload: str
    clients: int
    repetition: int
    connected: int
    delivered: int
    expected: int
    seconds: float
    cpu_seconds: float
    rss_per_connection: float
    latencies_ms: list[float]
    drops: int
    slow_consumer_disconnects: int
    timed_out: bool

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_seconds * 1e6 / self.delivered if self.delivered else float("nan")


class Runner:
    """Owns the client worker processes and runs a :class:`Plan`."""

    def __init__(self, plan: Plan, progress: Callable[[int, int, str], None]) -> None:
        self.plan = plan
        self.progress = progress
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[Channel] = []
        self.processes: list[Any] = []

    async def __aenter__(self) -> Runner:
        raise_open_files_limit()
        for index in range(self.plan.workers):
            channel, process = self._spawn(f"client worker {index}", worker_main, self.plan.loop)
            self.workers.append(channel)
            self.processes.append(process)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for channel in self.workers:
            with contextlib.suppress(OSError):
                channel.send("exit")
        for process in self.processes:
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.kill()

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> tuple[Channel, Any]:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=target, args=(child, *args), daemon=True)
        process.start()
        child.close()
        return Channel(parent, name), process

    async def _from_workers(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        return list(
            await asyncio.gather(*(channel.expect(kind, timeout) for channel in self.workers))
        )

    async def run(self) -> list[RoundResult]:
        plan = self.plan
        results: list[RoundResult] = []
        cells = [(w, n) for w in plan.workloads for n in plan.clients]
        total = len(cells) * plan.repetitions * len(plan.variants)
        done = 0
        for workload, clients in cells:
            for repetition in range(plan.repetitions):
                shift = repetition % len(plan.variants)
                order = plan.variants[shift:] + plan.variants[:shift]
                for name in order:
                    done += 1
                    self.progress(done, total, f"{workload} N={clients:,} {name}")
                    results.append(await self.run_round(name, workload, clients, repetition))
        return results

    def assignment(self, clients: int) -> list[tuple[list[str | None], list[bool]]]:
        """Topics and slow flags of every client, split over the workers."""
        plan = self.plan
        slow_every = round(1 / plan.slow) if plan.slow > 0 else 0
        shares: list[tuple[list[str | None], list[bool]]] = [([], []) for _ in self.workers]
        for index in range(clients):
            topics, slow = shares[index % len(self.workers)]
            topics.append(topic_of_client(index, plan.topics))
            slow.append(bool(slow_every) and index % slow_every == slow_every - 1)
        return shares

    async def run_round(
        self, name: str, workload: str, clients: int, repetition: int
    ) -> RoundResult:
        plan = self.plan
        host, process = self._spawn(
            f"{name} host", host_main, name, clients, plan, workload, plan.loop
        )
        try:
            _, port = await host.expect("listening", timeout=120)
            shares = self.assignment(clients)
            sources = [f"127.0.0.{2 + index}" for index in range(plan.sources)]
            for channel, (topics, slow) in zip(self.workers, shares, strict=True):
                channel.send("connect", plan.host, port, "/api/ws", topics, sources, slow)
            replies = await self._from_workers("connected", timeout=600)
            connected = sum(reply[1] for reply in replies)
            if connected < clients:
                print(
                    f"warning: {clients - connected} of {clients} clients failed to connect",
                    file=sys.stderr,
                )
            host.send("await_clients", connected)
            _, hub_connected, rss_growth = await host.expect("ready", timeout=180)
            expected = [
                expected_messages(plan, workload, clients, topics, slow) for topics, slow in shares
            ]
            for channel, count in zip(self.workers, expected, strict=True):
                channel.send("arm", count)
            # Frames that arrive before a worker is armed are not counted: wait for them all.
            await self._from_workers("armed", timeout=30)
            host.send("publish", workload)
            _, started = await host.expect("published", timeout=600)
            timed_out = False
            try:
                done = await self._from_workers("done", timeout=plan.timeout)
            except TimeoutError:
                timed_out = True
                for channel in self.workers:
                    channel.send("disarm")
                done = await self._from_workers("done", timeout=30)
            host.send("finish")
            _, cpu_seconds, counters = await host.expect("finished", timeout=60)
        finally:
            for channel in self.workers:
                channel.send("close")
            await self._from_workers("closed", timeout=60)
            host.send("stop")
            with contextlib.suppress(TimeoutError, ChannelClosed):
                await host.expect("stopped", timeout=60)
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()
        last = max((reply[1] for reply in done), default=started)
        return RoundResult(
            variant=name,
            workload=workload if workload == "burst" or plan.rate <= 0 else "stream-rate",
            clients=clients,
            repetition=repetition,
            connected=hub_connected,
            delivered=sum(reply[2] for reply in done),
            expected=sum(expected),
            seconds=max(last - started, 1e-9),
            cpu_seconds=cpu_seconds,
            rss_per_connection=rss_growth / max(1, hub_connected),
            latencies_ms=[sample for reply in done for sample in reply[3]],
            drops=counters["drops"],
            slow_consumer_disconnects=counters["slow_consumer_disconnects"],
            timed_out=timed_out,
        )


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank); NaN without samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
