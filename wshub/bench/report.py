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

from wshub.redis_backplane import redact_url

from .runner import RoundResult, median, percentile
from .servers import BASELINE, SINGLE_NODE

__all__ = [
    "SPREAD",
    "plot_figure",
    "summarize",
    "table",
    "warnings",
    "write_json",
    "write_plot",
]

NAN = float("nan")
#: Largest spread of one variant's rates over its repetitions (fastest over slowest, minus
#: one) that its median is quoted without a warning.
SPREAD = 0.25


def _paired_rate_ratios(rounds: list[RoundResult], against: list[RoundResult]) -> list[float]:
    """``rounds``' rates over those of ``against`` in the same repetition."""
    by_repetition = {r.repetition: r for r in against}
    return [
        r.rate / by_repetition[r.repetition].rate
        for r in rounds
        if r.repetition in by_repetition and by_repetition[r.repetition].rate > 0
    ]


def summarize(results: Iterable[RoundResult]) -> list[dict[str, Any]]:
    """One row per (workload, clients, variant): medians over repetitions, pooled latencies,
    and ratios to ``websockets.broadcast`` (and, for joined nodes, to one ``wshub-cython``
    node) paired by repetition."""
    groups: dict[tuple[str, int, str], list[RoundResult]] = {}
    for result in results:
        groups.setdefault((result.workload, result.clients, result.variant), []).append(result)
    rows = []
    for (workload, clients, variant), rounds in groups.items():
        baseline = {r.repetition: r for r in groups.get((workload, clients, BASELINE), [])}
        rate_ratios = _paired_rate_ratios(rounds, list(baseline.values()))
        single_node = groups.get((workload, clients, SINGLE_NODE), [])
        single_node_p99 = percentile([s for r in single_node for s in r.latencies_ms], 0.99)
        cross_node_p99 = percentile([s for r in rounds for s in r.cross_node_latencies_ms], 0.99)
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
                "wire_bytes_per_message": median([r.wire_bytes_per_message for r in rounds]),
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
                "rate_spread": max(r.rate for r in rounds) / min(r.rate for r in rounds) - 1
                if min(r.rate for r in rounds) > 0
                else NAN,
                "nodes": rounds[0].nodes,
                "latency_p99_cross_node_ms": cross_node_p99,
                "rate_vs_single_node": median(_paired_rate_ratios(rounds, single_node)),
                "cross_node_p99_vs_single_node": cross_node_p99 / single_node_p99
                if single_node_p99 > 0
                else NAN,
                "redis_cpu_us_per_message": median(
                    [
                        r.redis_cpu_seconds * 1e6 / r.delivered
                        for r in rounds
                        if r.redis_cpu_seconds is not None and r.delivered
                    ]
                ),
                "publish_failures": sum(r.publish_failures for r in rounds),
            }
        )
    return rows


def warnings(rows: list[dict[str, Any]]) -> list[str]:
    """What makes a table's figures shaky: one repetition, or repetitions that disagree by
    more than :data:`SPREAD`."""
    lines = []
    if any(row["repetitions"] == 1 for row in rows):
        lines.append(
            "warning: one repetition per variant: no median, and noise shows in every ratio; "
            "use --repetitions 3 or more for figures to quote"
        )
    for row in rows:
        spread = row["rate_spread"]
        if row["repetitions"] > 1 and (math.isnan(spread) or spread > SPREAD):
            shown = "a round delivered nothing" if math.isnan(spread) else f"{spread:.0%}"
            lines.append(
                f"warning: {row['variant']} ({row['workload']}, {row['clients']:,} clients): "
                f"its {row['repetitions']} repetitions disagree by {shown} (fastest over "
                f"slowest; more than {SPREAD:.0%}); the machine may be busy"
            )
    return lines


def _number(value: float, digits: int = 1) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The final table, one block per workload and client count."""
    header = (
        f"{'variant':<22}{'msg/s':>12}{'rate x bc':>11}{'CPU us/msg':>12}{'CPU x bc':>10}"
        f"{'B/msg':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'KiB/conn':>10}{'lost':>8}"
        f"{'drops':>8}{'4008s':>7}"
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
                f"{_number(row['rate_vs_broadcast'], 2):>11}"
                f"{_number(row['cpu_us_per_message'], 2):>12}"
                f"{_number(row['cpu_vs_broadcast'], 3):>10}"
                f"{_number(row['wire_bytes_per_message'], 0):>8}"
                f"{_number(row['latency_p50_ms']):>9}{_number(row['latency_p99_ms']):>9}"
                f"{_number(row['latency_max_ms']):>9}"
                f"{_number(row['rss_kib_per_connection']):>10}{lost:>8,}{row['drops']:>8,}"
                f"{row['slow_consumer_disconnects']:>7,}"
                + ("  timed out" if row["timed_out_rounds"] else "")
            )
    return "\n".join(lines + _nodes_table(rows))


def _nodes_table(rows: list[dict[str, Any]]) -> list[str]:
    """Joined nodes beside the single node of the same run; nothing without joined nodes."""
    joined = [row for row in rows if row["nodes"] > 1]
    if not joined:
        return []
    header = (
        f"{'workload, clients':<22}{'variant':<24}{'msg/s':>12}{'rate x 1':>10}"
        f"{'p99 ms':>9}{'cross-node p99 ms':>19}{'p99 x 1':>10}{'lost':>8}"
    )
    lines = ["", f"joined over Redis, against one {SINGLE_NODE} node", header, "-" * len(header)]

    def line(label: str, row: dict[str, Any], rate_ratio: float, p99_ratio: float) -> str:
        return (
            f"{label:<22}{row['variant']:<24}{_number(row['delivered_per_s'], 0):>12}"
            f"{_number(rate_ratio, 2):>10}{_number(row['latency_p99_ms']):>9}"
            f"{_number(row['latency_p99_cross_node_ms']):>19}{_number(p99_ratio, 2):>10}"
            f"{row['expected'] - row['delivered']:>8,}"
        )

    singles = {(r["workload"], r["clients"]): r for r in rows if r["variant"] == SINGLE_NODE}
    for row in joined:
        label = f"{row['workload']}, {row['clients']:,}"
        single = singles.get((row["workload"], row["clients"]))
        if single is not None:
            lines.append(line(label, single, 1.0, NAN))
            label = ""
        lines.append(
            line(label, row, row["rate_vs_single_node"], row["cross_node_p99_vs_single_node"])
        )
    return lines


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
    recorded_plan = dataclasses.asdict(plan)
    if recorded_plan.get("redis_url"):
        recorded_plan["redis_url"] = redact_url(recorded_plan["redis_url"])
    document = {
        "environment": environment(),
        "plan": recorded_plan,
        "summary": rows,
        # Not dataclasses.asdict: it would deep-copy millions of latency samples to drop them.
        "rounds": [
            {
                **{
                    field.name: None
                    if field.name.endswith("latencies_ms")
                    else getattr(r, field.name)
                    for field in dataclasses.fields(r)
                },
                "rate": r.rate,
            }
            for r in rounds
        ],
    }
    # JSON has no NaN: a figure that could not be measured is null.
    path.write_text(json.dumps(_without_nan(document), indent=2, allow_nan=False))


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value


def write_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write :func:`plot_figure` of ``rows`` to ``path`` (PNG).

    Raises:
        ImportError: matplotlib is not installed (``pip install wshub[plot]``).
    """
    import matplotlib.pyplot as plt

    figure = plot_figure(rows)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_figure(rows: list[dict[str, Any]]) -> Any:
    """Delivered msg/s against client count, one line per variant, one panel per workload;
    a workload measured at one client count gets labelled bars instead of lone dots.

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
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    for axis, workload in zip(axes[0], workloads, strict=True):
        counts = sorted({row["clients"] for row in rows if row["workload"] == workload})
        if len(counts) == 1:
            # One client count: a line would be a lone dot per variant; bars with their value.
            here = {
                row["variant"]: row["delivered_per_s"]
                for row in rows
                if row["workload"] == workload and not math.isnan(row["delivered_per_s"])
            }
            names = [variant for variant in variants if variant in here]
            bars = axis.bar(names, [here[name] for name in names])
            axis.bar_label(bars, labels=[f"{here[name]:,.0f}" for name in names], fontsize="small")
            axis.set_title(f"{workload}, {counts[0]:,} clients")
            axis.set_ylabel("delivered messages/s")
            axis.tick_params(axis="x", labelrotation=30)
            axis.grid(True, axis="y", alpha=0.3)
            continue
        for variant in variants:
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
    return figure
