"""How long joined hubs take to notice a Redis fault and to recover from it.

``python -m benchmarks.redis_faults [rounds]``: three ``wshub serve --redis-url`` nodes on
one redis-server (append-only file on). Each round kills Redis (SIGKILL), restarts it, then
freezes it (SIGSTOP) for 8 s and thaws it (SIGCONT); after each step it times how long until
every node's ``/readyz`` answers as it should (503 after a fault, 200 after the recovery),
polling each node every 20 ms. Prints the median and the longest time of each step over the
rounds. The README's "Redis down or restarting" paragraph quotes its figures.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import sys
import time
from collections.abc import Callable

from tests.processes import HubProcess
from wshub.bench.redis_server import RedisServer

NODES = 3
POLL = 0.02
DEADLINE = 30.0
FREEZE = 8.0


def until_all(nodes: list[HubProcess], status: int) -> float:
    """Seconds until every node's /readyz answers ``status`` (polled side by side)."""
    started = time.monotonic()

    def wait(node: HubProcess) -> float:
        while node.ready() != status:
            if time.monotonic() - started > DEADLINE:
                raise RuntimeError(f"{node.api}/readyz did not answer {status} in {DEADLINE} s")
            time.sleep(POLL)
        return time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        return max(pool.map(wait, nodes))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    times: dict[str, list[float]] = {}

    def step(name: str, action: Callable[[], None], nodes: list[HubProcess], status: int) -> None:
        action()
        times.setdefault(name, []).append(until_all(nodes, status))

    with RedisServer(persistent=True) as redis:
        extra = ["--redis-url", redis.url, "--no-log-connection-events"]
        nodes = [HubProcess(extra=extra) for _ in range(NODES)]
        try:
            until_all(nodes, 200)
            for _ in range(rounds):
                step("killed: every node 503", redis.kill, nodes, 503)
                step("restarted: every node 200", redis.restart, nodes, 200)
                step("frozen: every node 503", redis.freeze, nodes, 503)
                time.sleep(FREEZE)  # a freeze longer than the reader's socket timeout
                step("thawed: every node 200", redis.thaw, nodes, 200)
        finally:
            for node in nodes:
                node.stop()
    print(f"{NODES} nodes, {rounds} rounds, /readyz polled every {POLL * 1000:.0f} ms")
    print(f"{'step':<28}{'median s':>10}{'max s':>10}")
    for name, values in times.items():
        print(f"{name:<28}{statistics.median(values):>10.2f}{max(values):>10.2f}")


if __name__ == "__main__":
    main()
