"""Runs the measurements: worker processes, servers one at a time, rounds interleaved.

For each workload and client count, every repetition runs every variant once, in an order
rotated from one repetition to the next, so slow drifts of a shared machine spread over all
variants alike. A variant's round: start its server, connect the clients, read the server's
RSS, publish the workload, wait until every reading client has every message, read the
server's CPU time, disconnect, stop.

Joined nodes (``--nodes N``) are the same round with N server processes instead of one: the
clients are spread evenly over them, node 0 publishes, and the round's server CPU time is the
nodes' and (when the benchmark started it) Redis's together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import statistics
import sys
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from .channel import Channel, ChannelClosed
from .client import raise_open_files_limit, worker_main
from .host import host_main
from .redis_server import RedisServer, check_redis, delete_stream, process_cpu_seconds, start_redis
from .servers import NodeRole, client_path, nodes_of
from .workload import expected_messages, topic_of_client

__all__ = ["Plan", "RoundResult", "Runner", "Share"]


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
    nodes: int = 0  # N of the wshub-cython-N-nodes variant; 0 without one
    redis_url: str | None = None  # the Redis joining the nodes; None: start one


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
    wire_bytes: int = 0  # of the frames the clients read while armed
    nodes: int = 1
    # Latencies of clients on other nodes than the publishing one (node 0).
    cross_node_latencies_ms: list[float] = dataclasses.field(default_factory=list)
    # Included in cpu_seconds; None when Redis is not the benchmark's own or not used.
    redis_cpu_seconds: float | None = None
    publish_failures: int = 0

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_message(self) -> float:
        return self.cpu_seconds * 1e6 / self.delivered if self.delivered else float("nan")

    @property
    def wire_bytes_per_message(self) -> float:
        return self.wire_bytes / self.delivered if self.delivered else float("nan")


class Share(NamedTuple):
    """One worker's clients: each one's topic, whether it stops reading, and its node."""

    topics: list[str | None]
    slow: list[bool]
    nodes: list[int]


class Runner:
    """Owns the client worker processes (and the Redis of joined nodes) and runs a
    :class:`Plan`."""

    def __init__(self, plan: Plan, progress: Callable[[int, int, str], None]) -> None:
        self.plan = plan
        self.progress = progress
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[Channel] = []
        self.processes: list[Any] = []
        self.redis: RedisServer | None = None
        self.redis_url = plan.redis_url

    async def __aenter__(self) -> Runner:
        raise_open_files_limit()
        try:
            if self.plan.nodes > 1:
                await self._join_redis()
            for index in range(self.plan.workers):
                channel, process = self._spawn(
                    f"client worker {index}", worker_main, self.plan.loop
                )
                self.workers.append(channel)
                self.processes.append(process)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _join_redis(self) -> None:
        if self.redis_url is None:
            self.redis = await start_redis()
            self.redis_url = self.redis.url
        await check_redis(self.redis_url)

    async def __aexit__(self, *exc_info: object) -> None:
        for channel in self.workers:
            with contextlib.suppress(OSError):
                channel.send("exit")
        for process in self.processes:
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.kill()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
            self.redis = None

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> tuple[Channel, Any]:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=target, args=(child, *args), daemon=True)
        process.start()
        child.close()
        return Channel(parent, name), process

    async def _from_workers(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        return await self._from_all(self.workers, kind, timeout)

    @staticmethod
    async def _from_all(
        channels: list[Channel], kind: str, timeout: float
    ) -> list[tuple[Any, ...]]:
        return list(await asyncio.gather(*(channel.expect(kind, timeout) for channel in channels)))

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

    def assignment(self, clients: int, nodes: int = 1) -> list[Share]:
        """Topics, slow flags and nodes of every client, split over the workers.

        Client ``i`` goes to worker ``i % workers``; each worker spreads its own clients over
        the nodes in turn, so that every node gets as many clients, from every worker.
        """
        plan = self.plan
        workers = len(self.workers)
        slow_every = round(1 / plan.slow) if plan.slow > 0 else 0
        shares = [Share([], [], []) for _ in self.workers]
        for index in range(clients):
            share = shares[index % workers]
            share.topics.append(topic_of_client(index, plan.topics))
            share.slow.append(bool(slow_every) and index % slow_every == slow_every - 1)
            share.nodes.append(index // workers % nodes)
        return shares

    def _spawn_hosts(
        self, name: str, workload: str, clients: int, hosts: list[tuple[Channel, Any]]
    ) -> str | None:
        """Start the round's server processes, appending each to ``hosts`` at once so that a
        failure part-way still stops those already started; returns the Redis stream of
        joined nodes (None for one server)."""
        plan = self.plan
        nodes = nodes_of(name)
        if nodes == 1:
            hosts.append(
                self._spawn(f"{name} host", host_main, name, clients, plan, workload, plan.loop)
            )
            return None
        assert self.redis_url is not None, "joined nodes need the Runner's Redis"
        stream = f"wshub-bench:{uuid.uuid4().hex}"
        for node in range(nodes):
            role = NodeRole(self.redis_url, stream, publishes=node == 0)
            hosts.append(
                self._spawn(
                    f"{name} node {node}",
                    host_main,
                    name,
                    clients,
                    plan,
                    workload,
                    plan.loop,
                    role,
                )
            )
        return stream

    def _redis_cpu_seconds(self) -> float | None:
        pid = self.redis.pid if self.redis is not None else None
        return process_cpu_seconds(pid) if pid is not None else None

    async def _connect(
        self, channels: list[Channel], shares: list[Share], clients: int, name: str
    ) -> list[tuple[Any, ...]]:
        """Connect every worker's clients to their nodes; returns the hosts' "ready"."""
        plan = self.plan
        ports = [reply[1] for reply in await self._from_all(channels, "listening", 120)]
        sources = [f"127.0.0.{2 + index}" for index in range(plan.sources)]
        for channel, share in zip(self.workers, shares, strict=True):
            channel.send(
                "connect",
                plan.host,
                ports,
                client_path(name),
                share.topics,
                sources,
                share.slow,
                share.nodes,
            )
        replies = await self._from_workers("connected", timeout=600)
        connected = sum(reply[1] for reply in replies)
        if connected < clients:
            print(
                f"warning: {clients - connected} of {clients} clients failed to connect",
                file=sys.stderr,
            )
        for node, channel in enumerate(channels):
            channel.send("await_clients", sum(reply[3][node] for reply in replies))
        return await self._from_all(channels, "ready", timeout=180)

    async def _publish(
        self, channels: list[Channel], workload: str
    ) -> tuple[float, list[tuple[Any, ...]], bool]:
        """Publish on node 0 and wait for the workers' counts: ``(started, done,
        timed_out)``."""
        # The nodes that only forward start their CPU clocks before node 0 publishes.
        for channel in channels[1:]:
            channel.send("publish", workload)
        await self._from_all(channels[1:], "published", timeout=60)
        channels[0].send("publish", workload)
        _, started = await channels[0].expect("published", timeout=600)
        try:
            return started, await self._from_workers("done", timeout=self.plan.timeout), False
        except TimeoutError:
            for channel in self.workers:
                channel.send("disarm")
            return started, await self._from_workers("done", timeout=30), True

    async def run_round(
        self, name: str, workload: str, clients: int, repetition: int
    ) -> RoundResult:
        plan = self.plan
        nodes = nodes_of(name)
        hosts: list[tuple[Channel, Any]] = []
        stream: str | None = None
        try:
            stream = self._spawn_hosts(name, workload, clients, hosts)
            channels = [channel for channel, _ in hosts]
            shares = self.assignment(clients, nodes)
            ready = await self._connect(channels, shares, clients, name)
            expected = [
                expected_messages(plan, workload, clients, share.topics, share.slow)
                for share in shares
            ]
            for channel, count in zip(self.workers, expected, strict=True):
                channel.send("arm", count)
            # Frames that arrive before a worker is armed are not counted: wait for them all.
            await self._from_workers("armed", timeout=30)
            redis_cpu_before = self._redis_cpu_seconds() if nodes > 1 else None
            started, done, timed_out = await self._publish(channels, workload)
            for channel in channels:
                channel.send("finish")
            finished = await self._from_all(channels, "finished", timeout=60)
            redis_cpu = None
            if redis_cpu_before is not None:
                redis_cpu = (self._redis_cpu_seconds() or 0.0) - redis_cpu_before
        finally:
            for channel in self.workers:
                channel.send("close")
            await self._from_workers("closed", timeout=60)
            await self._stop_hosts(hosts)
            if stream is not None and self.redis_url is not None:
                await delete_stream(self.redis_url, stream)
        last = max((reply[1] for reply in done), default=started)
        counters = [reply[2] for reply in finished]
        publish_failures = sum(count.get("publish_failures", 0) for count in counters)
        if publish_failures:
            print(
                f"warning: {name} failed to publish {publish_failures} messages (see its log)",
                file=sys.stderr,
            )
        hub_connected = sum(reply[1] for reply in ready)
        # Per worker, per node: the samples of that worker's clients on that node.
        by_worker = [reply[3] for reply in done]
        return RoundResult(
            variant=name,
            workload=workload if workload == "burst" or plan.rate <= 0 else "stream-rate",
            clients=clients,
            repetition=repetition,
            connected=hub_connected,
            delivered=sum(reply[2] for reply in done),
            expected=sum(expected),
            seconds=max(last - started, 1e-9),
            cpu_seconds=sum(reply[1] for reply in finished) + (redis_cpu or 0.0),
            rss_per_connection=sum(reply[2] for reply in ready) / max(1, hub_connected),
            latencies_ms=[s for by_node in by_worker for samples in by_node for s in samples],
            drops=sum(count["drops"] for count in counters),
            slow_consumer_disconnects=sum(c["slow_consumer_disconnects"] for c in counters),
            timed_out=timed_out,
            wire_bytes=sum(reply[4] for reply in done),
            nodes=nodes,
            cross_node_latencies_ms=[
                s for by_node in by_worker for samples in by_node[1:] for s in samples
            ],
            redis_cpu_seconds=redis_cpu,
            publish_failures=publish_failures,
        )

    async def _stop_hosts(self, hosts: list[tuple[Channel, Any]]) -> None:
        for channel, _ in hosts:
            with contextlib.suppress(OSError):
                channel.send("stop")
        for channel, process in hosts:
            with contextlib.suppress(TimeoutError, ChannelClosed):
                await channel.expect("stopped", timeout=60)
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()


def percentile(samples: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank); NaN without samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
