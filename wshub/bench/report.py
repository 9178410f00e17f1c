"""Summaries of the rounds: the table, the JSON file and the plot."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .runner import RoundResult, median, percentile
from .servers import BASELINE

__all__ = ["summarize", "table", "write_json", "write_plot"]


def summarize(results: Iterable[RoundResult]) -> list[dict[str, Any]]:
    """One row per (workload, clients, variant): medians over repetitions, pooled latencies,
    and ratios to ``websockets.broadcast`` paired by repetition."""
    groups: dict[tuple[str, int, str], list[RoundResult]] = {}
    for result in results:
        groups.setdefault((result.workload, result.clients, result.variant), []).append(result)
    rows = []
    for (workload, clients, variant), rounds in groups.items():
        baseline = {r.repetition: r for r in groups.get((workload, clients, BASELINE), [])}
        rate_ratios = [
            r.rate / baseline[r.repetition].rate
            for r in rounds
            if r.repetition in baseline and baseline[r.repetition].rate > 0
        ]
        cpu_ratios = [
            r.cpu_us_per_message / baseline[r.repetition].cpu_us_per_message
            for r in rounds
            if r.repetition in baseline and r.delivered and baseline[r.repetition].delivered
        ]
        latencies = [sample for r in rounds for sample in r.latencies_ms]
        rows.append(
            {
                "workload": workload,
                "clients": clients,
                "variant": variant,
                "delivered_per_s": median([r.rate for r in rounds]),
                "rate_vs_broadcast": median(rate_ratios),
                "cpu_us_per_message": median([r.cpu_us_per_message for r in rounds]),
                "cpu_vs_broadcast": median(cpu_ratios),
                "latency_p50_ms": percentile(latencies, 0.50),
                "latency_p99_ms": percentile(latencies, 0.99),
                "latency_max_ms": max(latencies, default=float("nan")),
                "rss_kib_per_connection": median([r.rss_per_connection / 1024 for r in rounds]),
                "delivered": sum(r.delivered for r in rounds),
                "expected": sum(r.expected for r in rounds),
                "drops": sum(r.drops for r in rounds),
                "slow_consumer_disconnects": sum(r.slow_consumer_disconnects for r in rounds),
                "timed_out_rounds": sum(r.timed_out for r in rounds),
                "repetitions": len(rounds),
            }
        )
    return rows


def _number(value: float, digits: int = 1) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The final table, one block per workload and client count."""
    header = (
        f"{'variant':<22}{'msg/s':>12}{'x bcast':>9}{'CPU us/msg':>12}{'x bcast':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'KiB/conn':>10}{'lost':>8}{'drops':>8}"
        f"{'4008s':>7}"
    )
    lines: list[str] = []
    for key in dict.fromkeys((row["workload"], row["clients"]) for row in rows):
        lines += ["", f"{key[0]}, {key[1]:,} clients", header, "-" * len(header)]
        for row in rows:
            if (row["workload"], row["clients"]) != key:
                continue
            lost = row["expected"] - row["delivered"]
            lines.append(
                f"{row['variant']:<22}{_number(row['delivered_per_s'], 0):>12}"
                f"{_number(row['rate_vs_broadcast'], 2):>9}"
                f"{_number(row['cpu_us_per_message'], 2):>12}"
                f"{_number(row['cpu_vs_broadcast'], 3):>9}"
                f"{_number(row['latency_p50_ms']):>9}{_number(row['latency_p99_ms']):>9}"
                f"{_number(row['latency_max_ms']):>9}"
                f"{_number(row['rss_kib_per_connection']):>10}{lost:>8,}{row['drops']:>8,}"
                f"{row['slow_consumer_disconnects']:>7,}"
                + ("  timed out" if row["timed_out_rounds"] else "")
            )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """The machine and versions, for the record."""
    import websockets

    import wshub

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "processor_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "wshub": wshub.__version__,
        "websockets": websockets.version.version,
        "platform": platform.platform(),
    }


def write_json(
    path: Path, plan: Any, rows: list[dict[str, Any]], rounds: list[RoundResult]
) -> None:
    document = {
        "environment": environment(),
        "plan": dataclasses.asdict(plan),
        "summary": rows,
        "rounds": [
            {**dataclasses.asdict(r), "latencies_ms": None, "rate": r.rate} for r in rounds
        ],
    }
    path.write_text(json.dumps(document, indent=2, allow_nan=True))


def write_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Delivered msg/s against client count, one line per variant, one panel per workload.

    Raises:
        ImportError: matplotlib is not installed (``pip install wshub[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    figure, axes = plt.subplots(
        1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False
    )
    for axis, workload in zip(axes[0], workloads, strict=True):
        for variant in dict.fromkeys(row["variant"] for row in rows):
            points = sorted(
                (row["clients"], row["delivered_per_s"])
                for row in rows
                if row["workload"] == workload and row["variant"] == variant
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=variant)
        axis.set_title(f"{workload}")
        axis.set_xlabel("clients")
        axis.set_ylabel("delivered messages/s")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"wshub fan-out, {environment()['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
