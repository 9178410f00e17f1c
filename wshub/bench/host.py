"""The process that hosts one server variant for one round.

A fresh process per round, so that one variant's memory, garbage and timers never bleed into
another's figures: the RSS it grows by while clients connect is theirs alone, and its CPU time
is the server's alone. Driven over a pipe: ``("await_clients", count)``, ``("publish",
workload)``, ``("finish",)``, ``("stop",)``; it answers ``("listening", port)``,
``("ready", connected, rss_growth)``, ``("published", started)``, ``("finished",
cpu_seconds, counters)`` and ``("stopped",)``.

Joined nodes (``--nodes``) are one host each, given a :class:`~wshub.bench.servers.NodeRole`.
Only node 0 publishes; on the others ``("publish", workload)`` only starts the CPU clock, so
that every node's CPU time covers the same stretch: from just before the first publish to
the end of the round.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from multiprocessing.connection import Connection
from typing import Any

from .channel import Channel
from .client import raise_open_files_limit
from .servers import NodeRole, make_variant
from .workload import schedule, shape

__all__ = ["host_main", "rss_bytes"]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


async def _host(
    pipe: Connection,
    name: str,
    clients: int,
    plan: Any,
    workload: str,
    role: NodeRole | None,
) -> None:
    channel = Channel(pipe, "the benchmark")
    messages, _ = shape(plan, workload, clients)
    variant = make_variant(name, clients, messages, plan.flush_interval, role)
    publishes = role is None or role.publishes
    batches = schedule(plan, workload, clients) if publishes else []
    gc.collect()
    rss_before = rss_bytes()
    await variant.start(plan.host)
    channel.send("listening", variant.port)
    try:
        _, count = await channel.expect("await_clients", timeout=600)
        async with asyncio.timeout(120):
            while variant.connected < count:
                await asyncio.sleep(0.01)
        gc.collect()
        channel.send("ready", variant.connected, rss_bytes() - rss_before)
        await channel.expect("publish", timeout=600)
        loop = asyncio.get_running_loop()
        interval = 1.0 / plan.rate if workload != "burst" and plan.rate > 0 else 0.0
        cpu_started = time.process_time()
        started = time.time()
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
        channel.send("published", started)
        await channel.expect("finish", timeout=600)
        channel.send("finished", time.process_time() - cpu_started, variant.counters())
        await channel.expect("stop", timeout=600)
    finally:
        await variant.stop()
        channel.send("stopped")


def host_main(
    pipe: Connection,
    name: str,
    clients: int,
    plan: Any,
    workload: str,
    loop_name: str,
    role: NodeRole | None = None,
) -> None:
    """Entry point of a host process; ``clients`` is the round's total, over every node."""
    raise_open_files_limit()
    coroutine = _host(pipe, name, clients, plan, workload, role)
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
