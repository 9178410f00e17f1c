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
import gc
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .client import raise_open_files_limit, worker_main
from .servers import Variant, event_data, make_variant

__all__ = ["Plan", "RoundResult", "Runner"]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure."""

    variants: tuple[str, ...]
    clients: tuple[int, ...]
    workloads: tuple[str, ...]  # "burst" and/or "stream"
    burst: int  # K: messages per loop iteration in a burst
    bursts: int  # bursts per round
    stream_messages: int  # messages per round of "stream" when rate is 0
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


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


class Runner:
    """Owns the worker processes and runs a :class:`Plan`."""

    def __init__(self, plan: Plan, progress: Callable[[str], None]) -> None:
        self.plan = plan
        self.progress = progress
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        self.inbox: asyncio.Queue[tuple[int, tuple[Any, ...]]] = asyncio.Queue()

    async def __aenter__(self) -> Runner:
        raise_open_files_limit()
        context = multiprocessing.get_context("spawn")
        loop = asyncio.get_running_loop()
        for index in range(self.plan.workers):
            parent, child = context.Pipe()
            process = context.Process(
                target=worker_main, args=(child, self.plan.loop), daemon=True
            )
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)
            loop.add_reader(parent.fileno(), self._on_reply, index)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for pipe in self.pipes:
            loop.remove_reader(pipe.fileno())
            with contextlib.suppress(OSError):
                pipe.send(("exit",))
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()

    def _on_reply(self, index: int) -> None:
        try:
            self.inbox.put_nowait((index, self.pipes[index].recv()))
        except EOFError:
            asyncio.get_running_loop().remove_reader(self.pipes[index].fileno())
            self.inbox.put_nowait((index, ("died",)))

    async def _gather(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        """One reply of ``kind`` from every worker."""
        replies: list[tuple[Any, ...] | None] = [None] * len(self.pipes)
        async with asyncio.timeout(timeout):
            while any(reply is None for reply in replies):
                index, reply = await self.inbox.get()
                if reply[0] == "died":
                    raise RuntimeError(f"benchmark worker {index} died")
                if reply[0] == kind:
                    replies[index] = reply
        return [reply for reply in replies if reply is not None]

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
                    self.progress(f"[{done}/{total}] {workload} N={clients} {name}")
                    results.append(await self.run_round(name, workload, clients, repetition))
        return results

    def assignment(self, clients: int) -> list[tuple[list[str | None], list[bool]]]:
        """Topics and slow flags of every client, split over the workers."""
        plan = self.plan
        slow_every = round(1 / plan.slow) if plan.slow > 0 else 0
        shares: list[tuple[list[str | None], list[bool]]] = [([], []) for _ in self.pipes]
        for index in range(clients):
            topics, slow = shares[index % len(self.pipes)]
            topics.append(f"t{index % plan.topics}" if plan.topics else None)
            slow.append(bool(slow_every) and index % slow_every == slow_every - 1)
        return shares

    def schedule(self, workload: str) -> list[list[tuple[dict[str, Any], str | None]]]:
        """The batches of a round: each batch is published in one loop iteration."""
        plan = self.plan
        if workload == "burst":
            count, per_batch = plan.bursts * plan.burst, plan.burst
        elif plan.rate > 0:
            count, per_batch = max(1, int(plan.rate * plan.duration)), 1
        else:
            count, per_batch = plan.stream_messages, 1
        events = [
            (event_data(index, plan.size), f"t{index % plan.topics}" if plan.topics else None)
            for index in range(count)
        ]
        return [events[start : start + per_batch] for start in range(0, count, per_batch)]

    async def run_round(
        self, name: str, workload: str, clients: int, repetition: int
    ) -> RoundResult:
        plan = self.plan
        batches = self.schedule(workload)
        messages = sum(len(batch) for batch in batches)
        variant = make_variant(name, clients, messages)
        gc.collect()
        rss_before = rss_bytes()
        await variant.start(plan.host)
        try:
            shares = self.assignment(clients)
            sources = [f"127.0.0.{2 + index}" for index in range(plan.sources)]
            for pipe, (topics, slow) in zip(self.pipes, shares, strict=True):
                pipe.send(("connect", plan.host, variant.port, "/api/ws", topics, sources, slow))
            replies = await self._gather("connected", timeout=300)
            failed = sum(reply[2] for reply in replies)
            if failed:
                print(f"warning: {failed} of {clients} clients failed to connect", file=sys.stderr)
            async with asyncio.timeout(60):
                while variant.connected < clients - failed:
                    await asyncio.sleep(0.01)
            gc.collect()
            rss_per_connection = (rss_bytes() - rss_before) / max(1, variant.connected)
            expected = [self.expected(batches, topics, slow) for topics, slow in shares]
            result = await self.measure(variant, batches, expected)
            counters = variant.counters()  # before stop(), whose goodbyes would count
        finally:
            for pipe in self.pipes:
                pipe.send(("close",))
            await self._gather("closed", timeout=60)
            await variant.stop()
        delivered, seconds, cpu, latencies, timed_out = result
        return RoundResult(
            variant=name,
            workload=workload if workload == "burst" or plan.rate <= 0 else "stream-rate",
            clients=clients,
            repetition=repetition,
            connected=clients - failed,
            delivered=delivered,
            expected=sum(expected),
            seconds=seconds,
            cpu_seconds=cpu,
            rss_per_connection=rss_per_connection,
            latencies_ms=latencies,
            drops=counters["drops"],
            slow_consumer_disconnects=counters["slow_consumer_disconnects"],
            timed_out=timed_out,
        )

    @staticmethod
    def expected(
        batches: list[list[tuple[dict[str, Any], str | None]]],
        topics: list[str | None],
        slow: list[bool],
    ) -> int:
        per_topic: dict[str | None, int] = {}
        for batch in batches:
            for _, topic in batch:
                per_topic[topic] = per_topic.get(topic, 0) + 1
        everyone = per_topic.get(None, 0)
        return sum(
            everyone + (per_topic.get(topic, 0) if topic is not None else 0)
            for topic, is_slow in zip(topics, slow, strict=True)
            if not is_slow
        )

    async def measure(
        self,
        variant: Variant,
        batches: list[list[tuple[dict[str, Any], str | None]]],
        expected: list[int],
    ) -> tuple[int, float, float, list[float], bool]:
        plan = self.plan
        for pipe, count in zip(self.pipes, expected, strict=True):
            pipe.send(("arm", count))
        # Frames that arrive before a worker is armed are not counted: wait for all of them.
        await self._gather("armed", timeout=30)
        loop = asyncio.get_running_loop()
        interval = 1.0 / plan.rate if plan.rate > 0 and len(batches[0]) == 1 else 0.0
        started = time.time()
        cpu_started = time.process_time()
        next_at = loop.time()
        for batch in batches:
            now = time.time()
            for data, _ in batch:
                data["sent_at"] = now
            await variant.publish(batch)
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            else:
                await asyncio.sleep(0)  # the next batch in the next loop iteration
        timed_out = False
        try:
            replies = await self._gather("done", timeout=plan.timeout)
        except TimeoutError:
            timed_out = True
            for pipe in self.pipes:
                pipe.send(("disarm",))
            replies = await self._gather("done", timeout=30)
        cpu = time.process_time() - cpu_started
        last = max((reply[1] for reply in replies), default=started)
        delivered = sum(reply[2] for reply in replies)
        latencies = [sample for reply in replies for sample in reply[3]]
        return delivered, max(last - started, 1e-9), cpu, latencies, timed_out


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank); NaN without samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
