"""What the hub's per-iteration write coalescing buys for a burst, over real sockets.

A burst is K ``run_progress`` events (a ~300-byte ``data`` object like the one
``Hub.notify_run_progress`` sends, plus a send timestamp) published to N WebSocket clients in
one event-loop iteration. The server runs in this process on one event loop (uvloop or
asyncio); the clients run in separate worker processes (``spawn``), so their CPU is not
counted. Four servers, each on its own port with its own N client connections, are measured
round by round, the order of the variants rotated every repetition:

``wshub-cython``
    ``Hub(implementation="cython")`` behind ``wshub.serve``; K ``hub.broadcast_to_all`` calls.
    The hub queues the shared frames and flushes once at the end of the iteration: one
    ``transport.write`` per client for the whole burst.
``wshub-cython-no-coalescing``
    The same hub, but ``hub._fanout.flush()`` right after every broadcast, so every message is
    its own ``transport.write`` per client. Everything else (serialize once, frame once, the
    compiled fan-out loop) is identical, so the difference between this variant and
    ``wshub-cython`` is exactly what coalescing buys, not what the compiled core buys.
``wshub-python``
    As ``wshub-cython`` with the pure-Python core (``implementation="python"``).
``websockets.broadcast``
    A plain ``websockets.asyncio.server.serve`` server (compression off); K calls to
    ``websockets.asyncio.server.broadcast(connections, orjson.dumps(envelope), text=True)``
    with the same envelope the hub sends, serialized once per message as a careful user would.
    websockets frames the message once per connection and writes it once per connection.

Per variant and round it measures the wall time from the start of the burst until the last
client has received all K messages (client-side ``CLOCK_MONOTONIC``, comparable across
processes on Linux) and the server process's CPU time (``time.process_time()``) over the same
span, and derives delivered messages per second (N*K / wall), server CPU microseconds per
delivered message and the ratios of both to ``websockets.broadcast`` and to
``wshub-cython-no-coalescing``. Ratios are paired: computed within one repetition, where the
variants ran back to back, then the median over repetitions is reported, which keeps most of
the noise of a shared machine out of them. One unmeasured warm-up round per variant comes
first. Wall time includes the clients' parsing (websockets is not free); server CPU per message
is the cleaner figure.

Run it from the repository root (the compiled core must be built in place or installed)::

    PYTHONPATH=. python benchmarks/coalescing.py
    PYTHONPATH=. python benchmarks/coalescing.py --clients 1000 --burst 100 --rounds 5
    PYTHONPATH=. python benchmarks/coalescing.py --loop asyncio --json results.json

The clients always use uvloop when it is installed (a lean reader: ``recv(decode=False)`` and a
prefix check, no JSON decoding); ``--loop`` picks the server's loop. The hubs' and clients'
keepalive pings are effectively off so that no ping traffic lands inside a measured round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from multiprocessing.connection import Connection
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.asyncio.server import serve as websockets_serve
from websockets.exceptions import ConnectionClosed

import wshub
from wshub.fanout import Implementation
from wshub.protocol import MessageClock

CYTHON = "wshub-cython"
NO_COALESCING = "wshub-cython-no-coalescing"
PYTHON = "wshub-python"
BASELINE = "websockets.broadcast"
VARIANTS = (CYTHON, NO_COALESCING, PYTHON, BASELINE)

# Every measured message starts with this; the hub's welcome message does not.
PREFIX = b'{"type":"run_progress"'
RUN_ID = "run-20251125T185300Z-mainnet-perf-7f3a9c2e4b1d4e8f9a0b1c2d3e4f"
TEST_NAME = "eth_getLogs/archive/range=10000-blocks/clients=geth,erigon,nethermind,besu,reth"
KEEPALIVE_OFF = 3600.0  # seconds: longer than any run
CONNECT_CONCURRENCY = 64  # handshakes in flight per worker
ROUND_TIMEOUT = 120.0


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event-loop constructor for ``"uvloop"`` or ``"asyncio"``."""
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def make_payload(index: int, burst: int) -> dict[str, Any]:
    """One ~300-byte ``run_progress`` data object, as ``notify_run_progress`` builds it."""
    return {
        "run_id": RUN_ID,
        "test_name": TEST_NAME,
        "progress": (index + 1) / burst,
        "elapsed_s": 1234.567 + index * 0.01,
        "requests_done": 1_523_400 + index * 100,
        "current_rps": 1234.5,
        "error_rate": 0.0012,
        "sent_at": time.time(),
    }


# The client worker processes


class ClientState:
    """One worker's counters: messages received per variant since the last ``arm``."""

    def __init__(self, pipe: Connection, shares: list[int]) -> None:
        self.pipe = pipe
        self.shares = shares
        self.counts = [0] * len(shares)
        self.targets = [-1] * len(shares)
        self.cpu_start = [0.0] * len(shares)

    def arm(self, variant: int, burst: int) -> None:
        self.counts[variant] = 0
        self.targets[variant] = burst * self.shares[variant]
        self.cpu_start[variant] = time.process_time()

    async def read(self, ws: ClientConnection, variant: int) -> None:
        counts = self.counts
        try:
            while True:
                message = await ws.recv(decode=False)
                if message.startswith(PREFIX):
                    counts[variant] += 1
                    if counts[variant] == self.targets[variant]:
                        self.pipe.send(
                            (
                                "done",
                                variant,
                                time.monotonic(),
                                time.process_time() - self.cpu_start[variant],
                            )
                        )
        except ConnectionClosed:
            return


async def client_main(index: int, ports: list[int], share: int, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    state = ClientState(pipe, [share] * len(ports))
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one(port: int) -> ClientConnection:
        async with limit:
            return await connect(
                f"ws://127.0.0.1:{port}/api/ws",
                compression=None,
                ping_interval=None,
                max_queue=None,
                max_size=None,
                open_timeout=120,
                close_timeout=1,
            )

    connections: list[list[ClientConnection]] = []
    for port in ports:
        connections.append(list(await asyncio.gather(*(open_one(port) for _ in range(share)))))
    readers = [
        asyncio.ensure_future(state.read(ws, variant))
        for variant, group in enumerate(connections)
        for ws in group
    ]
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def on_command() -> None:
        try:
            commands.put_nowait(pipe.recv())
        except EOFError:
            loop.remove_reader(pipe.fileno())
            commands.put_nowait(("stop",))

    loop.add_reader(pipe.fileno(), on_command)
    pipe.send(("ready", index, sum(len(group) for group in connections)))
    while True:
        command = await commands.get()
        if command[0] == "arm":
            _, variant, burst = command
            state.arm(variant, burst)
            pipe.send(("armed", variant))
        elif command[0] == "stop":
            break
    loop.remove_reader(pipe.fileno())
    for group in connections:
        for ws in group:
            ws.transport.abort()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


def client_worker(index: int, ports: list[int], share: int, pipe: Connection) -> None:
    """Entry point of a client process: ``share`` connections to each of ``ports``."""
    raise_nofile_limit()
    try:
        factory = loop_factory("uvloop")
    except ImportError:
        factory = asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(client_main(index, ports, share, pipe))
    except BaseException:
        with contextlib.suppress(Exception):
            pipe.send(("error", index, traceback.format_exc()))
        raise


# The server side


@dataclass
class Variant:
    name: str
    port: int
    burst: Callable[[int], None]
    clients: Callable[[], int]
    hub: wshub.Hub | None = None


@dataclass
class RoundResult:
    variant: str
    repetition: int  # -1: warm-up
    position: int
    wall_s: float
    server_cpu_s: float
    client_cpu_s: float
    notice_s: float  # until this process had every client's report
    writes: int | None
    drops: int | None


@dataclass
class Summary:
    variant: str
    wall_ms: float
    msgs_per_s: float
    server_cpu_ms: float
    cpu_us_per_msg: float
    cpu_us_per_msg_min: float
    cpu_us_per_msg_max: float
    client_cpu_ms: float
    writes_per_round: float | None
    rate_vs_baseline: float
    cpu_vs_baseline: float
    rate_vs_no_coalescing: float
    cpu_vs_no_coalescing: float
    extra: dict[str, Any] = field(default_factory=dict)


def hub_config(clients: int, burst: int) -> wshub.HubConfig:
    return wshub.HubConfig(
        max_clients=clients + 10,
        client_buffer_size=max(256, burst),
        default_topics=("*",),
        log_connection_events=False,
        ping_interval=KEEPALIVE_OFF,
        pong_timeout=KEEPALIVE_OFF,
    )


def hub_client_count(hub: wshub.Hub) -> Callable[[], int]:
    return lambda: hub.client_count


def hub_burst(hub: wshub.Hub, *, coalesce: bool) -> Callable[[int], None]:
    def burst_coalesced(k: int) -> None:
        for i in range(k):
            hub.broadcast_to_all("run_progress", make_payload(i, k))

    def burst_uncoalesced(k: int) -> None:
        fanout = hub._fanout
        for i in range(k):
            hub.broadcast_to_all("run_progress", make_payload(i, k))
            fanout.flush()

    return burst_coalesced if coalesce else burst_uncoalesced


def broadcast_burst(connections: set[ServerConnection]) -> Callable[[int], None]:
    clock = MessageClock()

    def burst(k: int) -> None:
        for i in range(k):
            message_id, timestamp = clock.next()
            envelope = {
                "type": "run_progress",
                "data": make_payload(i, k),
                "timestamp": timestamp,
                "id": message_id,
            }
            broadcast(connections, orjson.dumps(envelope), text=True)

    return burst


class Workers:
    """The client processes and their pipes, read from the event loop."""

    def __init__(self, count: int, ports: list[int], clients: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.loop = asyncio.get_running_loop()
        self.pipes: list[Connection] = []
        self.inboxes: list[asyncio.Queue[tuple[Any, ...]]] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.shares = [clients // count + (1 if i < clients % count else 0) for i in range(count)]
        for i, share in enumerate(self.shares):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=client_worker, args=(i, ports, share, child_end), daemon=True
            )
            process.start()
            child_end.close()
            inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
            self.loop.add_reader(parent_end.fileno(), self._on_readable, parent_end, inbox)
            self.pipes.append(parent_end)
            self.inboxes.append(inbox)
            self.processes.append(process)

    def _on_readable(self, pipe: Connection, inbox: asyncio.Queue[tuple[Any, ...]]) -> None:
        try:
            inbox.put_nowait(pipe.recv())
        except (EOFError, OSError):
            self.loop.remove_reader(pipe.fileno())
            inbox.put_nowait(("eof",))

    async def collect(self, kind: str) -> list[tuple[Any, ...]]:
        """One message of ``kind`` from every worker."""
        replies = []
        for inbox in self.inboxes:
            reply = await inbox.get()
            if reply[0] != kind:
                raise RuntimeError(f"expected {kind!r} from a client worker, got {reply!r}")
            replies.append(reply)
        return replies

    def send(self, message: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(pipe.fileno())
            pipe.close()


async def run_round(
    variant: Variant, index: int, workers: Workers, burst: int
) -> tuple[float, float, float, float, int | None, int | None]:
    workers.send(("arm", index, burst))
    await workers.collect("armed")
    gc.collect()
    stats0 = variant.hub.stats() if variant.hub is not None else None
    cpu0 = time.process_time()
    t0 = time.monotonic()
    variant.burst(burst)
    async with asyncio.timeout(ROUND_TIMEOUT):
        reports = await workers.collect("done")
    notice = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    wall = max(report[2] for report in reports) - t0
    client_cpu = sum(report[3] for report in reports)
    writes = drops = None
    if variant.hub is not None and stats0 is not None:
        stats1 = variant.hub.stats()
        writes = stats1["writes"] - stats0["writes"]
        drops = stats1["drops"] - stats0["drops"]
    return wall, cpu, client_cpu, notice, writes, drops


async def wait_for_clients(variants: list[Variant], clients: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while any(v.clients() < clients for v in variants):
            await asyncio.sleep(0.05)


async def server_main(args: argparse.Namespace) -> dict[str, Any]:
    clients: int = args.clients
    burst: int = args.burst
    started = time.monotonic()
    variants: list[Variant] = []
    async with contextlib.AsyncExitStack() as stack:
        hub_variants: tuple[tuple[str, Implementation, bool], ...] = (
            (CYTHON, "cython", True),
            (NO_COALESCING, "cython", False),
            (PYTHON, "python", True),
        )
        for name, implementation, coalesce in hub_variants:
            hub = wshub.Hub(hub_config(clients, burst), implementation=implementation)
            server = await stack.enter_async_context(
                wshub.serve(hub, "127.0.0.1", 0, backlog=2048)
            )
            port = server.sockets[0].getsockname()[1]
            burst_fn = hub_burst(hub, coalesce=coalesce)
            variants.append(Variant(name, port, burst_fn, hub_client_count(hub), hub))
        connections: set[ServerConnection] = set()

        async def handler(connection: ServerConnection) -> None:
            connections.add(connection)
            try:
                await connection.wait_closed()
            finally:
                connections.discard(connection)

        server = await stack.enter_async_context(
            websockets_serve(
                handler,
                "127.0.0.1",
                0,
                compression=None,
                ping_interval=None,
                backlog=2048,
            )
        )
        port = server.sockets[0].getsockname()[1]
        variants.append(
            Variant(BASELINE, port, broadcast_burst(connections), lambda: len(connections))
        )

        workers = Workers(args.workers, [v.port for v in variants], clients)
        try:
            ready = await workers.collect("ready")
            await wait_for_clients(variants, clients, timeout=60)
            setup_s = time.monotonic() - started
            print(
                f"{sum(r[2] for r in ready)} client connections up in {setup_s:.1f} s "
                f"({args.workers} worker processes); measuring...",
                flush=True,
            )
            results: list[RoundResult] = []
            schedule: list[tuple[int, list[int]]] = [(-1, list(range(len(variants))))]
            for rep in range(args.rounds):
                shift = rep % len(variants)
                order = list(range(len(variants)))
                schedule.append((rep, order[shift:] + order[:shift]))
            for rep, order in schedule:
                for position, index in enumerate(order):
                    variant = variants[index]
                    wall, cpu, client_cpu, notice, writes, drops = await run_round(
                        variant, index, workers, burst
                    )
                    results.append(
                        RoundResult(
                            variant.name,
                            rep,
                            position,
                            wall,
                            cpu,
                            client_cpu,
                            notice,
                            writes,
                            drops,
                        )
                    )
                    await asyncio.sleep(0.02)
            measured_s = time.monotonic() - started
        finally:
            workers.close()
        # Let the servers see the clients go before the hubs say goodbye to them.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while any(v.clients() for v in variants):
                    await asyncio.sleep(0.05)
        hub_stats = {v.name: v.hub.stats() for v in variants if v.hub is not None}
    return {
        "results": results,
        "setup_s": setup_s,
        "measured_s": measured_s,
        "hub_stats": hub_stats,
        "ports": {v.name: v.port for v in variants},
    }


def summarize(results: list[RoundResult], clients: int, burst: int) -> list[Summary]:
    delivered = clients * burst
    measured = [r for r in results if r.repetition >= 0]
    by_rep: dict[int, dict[str, RoundResult]] = {}
    for r in measured:
        by_rep.setdefault(r.repetition, {})[r.variant] = r

    def paired(name: str, reference: str, metric: Callable[[RoundResult], float]) -> float:
        return statistics.median(
            metric(rounds[name]) / metric(rounds[reference]) for rounds in by_rep.values()
        )

    def rate(r: RoundResult) -> float:
        return delivered / r.wall_s

    def cpu_per_msg(r: RoundResult) -> float:
        return r.server_cpu_s / delivered

    summaries = []
    for name in VARIANTS:
        rounds = [r for r in measured if r.variant == name]
        per_msg = [cpu_per_msg(r) * 1e6 for r in rounds]
        writes = [r.writes for r in rounds if r.writes is not None]
        summaries.append(
            Summary(
                variant=name,
                wall_ms=statistics.median(r.wall_s for r in rounds) * 1e3,
                msgs_per_s=statistics.median(rate(r) for r in rounds),
                server_cpu_ms=statistics.median(r.server_cpu_s for r in rounds) * 1e3,
                cpu_us_per_msg=statistics.median(per_msg),
                cpu_us_per_msg_min=min(per_msg),
                cpu_us_per_msg_max=max(per_msg),
                client_cpu_ms=statistics.median(r.client_cpu_s for r in rounds) * 1e3,
                writes_per_round=statistics.median(writes) if writes else None,
                rate_vs_baseline=paired(name, BASELINE, rate),
                cpu_vs_baseline=paired(name, BASELINE, cpu_per_msg),
                rate_vs_no_coalescing=paired(name, NO_COALESCING, rate),
                cpu_vs_no_coalescing=paired(name, NO_COALESCING, cpu_per_msg),
                extra={
                    "drops": sum(r.drops or 0 for r in rounds),
                    "notice_ms_median": statistics.median(r.notice_s for r in rounds) * 1e3,
                },
            )
        )
    return summaries


def print_table(summaries: list[Summary], clients: int, burst: int) -> None:
    header = (
        f"{'variant':<28}{'wall ms':>9}{'msg/s':>11}{'srv CPU ms':>11}{'CPU us/msg':>11}"
        f"{'(min-max)':>14}{'cli CPU ms':>11}{'writes':>8}"
        f"{'rate/ws':>9}{'cpu/ws':>8}{'rate/nc':>9}{'cpu/nc':>8}"
    )
    print()
    print(header)
    print("-" * len(header))
    for s in summaries:
        writes = f"{s.writes_per_round:.0f}" if s.writes_per_round is not None else "-"
        spread = f"{s.cpu_us_per_msg_min:.2f}-{s.cpu_us_per_msg_max:.2f}"
        print(
            f"{s.variant:<28}{s.wall_ms:>9.1f}{s.msgs_per_s:>11,.0f}{s.server_cpu_ms:>11.1f}"
            f"{s.cpu_us_per_msg:>11.3f}{spread:>14}{s.client_cpu_ms:>11.0f}{writes:>8}"
            f"{s.rate_vs_baseline:>8.2f}x{s.cpu_vs_baseline:>7.2f}x"
            f"{s.rate_vs_no_coalescing:>8.2f}x{s.cpu_vs_no_coalescing:>7.2f}x"
        )
    print(
        f"\n{clients} clients x {burst} messages = {clients * burst:,} deliveries per round; "
        "medians over repetitions.\n"
        "writes: hub transport writes per round (websockets.broadcast writes once per message "
        "and connection).\n"
        "rate/ws, cpu/ws: delivered msg/s and server CPU per message relative to "
        "websockets.broadcast;\n"
        "rate/nc, cpu/nc: the same relative to wshub-cython-no-coalescing "
        "(paired per repetition, median).\n"
        "cli CPU ms: CPU of all client processes over the round (summed), for context."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=500, help="connections per variant (N)")
    parser.add_argument("--burst", type=int, default=100, help="messages per round (K)")
    parser.add_argument("--rounds", type=int, default=5, help="repetitions (R)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)
    for name in ("clients", "burst", "rounds", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    nofile = raise_nofile_limit()
    needed = 4 * args.clients + 100
    if nofile < needed:
        sys.exit(f"RLIMIT_NOFILE hard limit {nofile} is below the {needed} descriptors needed")
    message_id, timestamp = MessageClock().next()
    payload = make_payload(0, args.burst)
    data_size = len(orjson.dumps(payload))
    envelope = {"type": "run_progress", "data": payload, "timestamp": timestamp, "id": message_id}
    frame_size = len(orjson.dumps(envelope)) + 4  # 4-byte header for 126..65535 bytes
    print(
        f"server loop {args.loop}, {args.clients} clients per variant, burst {args.burst}, "
        f"{args.rounds} repetitions; data {data_size} B, frame {frame_size} B; "
        f"Python {platform.python_version()}, websockets {version('websockets')}, "
        f"wshub {wshub.__version__}",
        flush=True,
    )
    coroutine: Coroutine[Any, Any, dict[str, Any]] = server_main(args)
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        outcome = runner.run(coroutine)
    results: list[RoundResult] = outcome["results"]
    summaries = summarize(results, args.clients, args.burst)
    print_table(summaries, args.clients, args.burst)
    drops = sum(s.extra["drops"] for s in summaries)
    print(
        f"setup {outcome['setup_s']:.1f} s, total {outcome['measured_s']:.1f} s; "
        f"hub drops during rounds: {drops}"
    )
    if args.json:
        document = {
            "config": {
                "clients": args.clients,
                "burst": args.burst,
                "rounds": args.rounds,
                "loop": args.loop,
                "workers": args.workers,
                "data_bytes": data_size,
                "frame_bytes": frame_size,
                "python": platform.python_version(),
                "websockets": version("websockets"),
                "wshub": wshub.__version__,
            },
            "summary": [asdict(s) for s in summaries],
            "rounds": [asdict(r) for r in results],
            "hub_stats": outcome["hub_stats"],
            "setup_s": outcome["setup_s"],
            "total_s": outcome["measured_s"],
        }
        with open(args.json, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
