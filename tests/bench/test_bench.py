"""``python -m wshub.bench`` end to end, small: real servers, real worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wshub.bench import main
from wshub.bench.servers import VARIANTS

SMALL = ["--clients", "12", "--repetitions", "1", "--workers", "2", "--sources", "2"]


def test_every_variant_delivers_every_message(tmp_path: Path) -> None:
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    arguments = [*SMALL, "--bursts", "3", "--burst", "10", "--messages", "30"]
    assert main([*arguments, "--json", str(report), "--plot", str(plot)]) == 0
    summary = json.loads(report.read_text())["summary"]
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


@pytest.mark.parametrize(
    "arguments",
    [["--slow", "1.5"], ["--variants", "nope"], ["--burst", "0"], ["--clients", ""]],
)
def test_bad_options_stop_with_a_message(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2
    assert "error:" in capsys.readouterr().err
