"""The dashboard in a real browser: headless Chromium against ``python -m wshub serve``.

Events go in through the internal HTTP API, as the runner sends them, and the test reads
what a person would see. Chromium comes as ``tests/tools.py`` says. ``WSHUB_SCREENSHOT=1``
also writes ``docs/dashboard.png`` for the README.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from playwright.sync_api import ConsoleMessage, Error, Locator, Page, expect, sync_playwright
from redis import Redis

from wshub import mint_token
from wshub.bench.redis_server import RedisServer
from wshub.compression import WINDOW_BITS

from .helpers import SECRET
from .processes import HubProcess
from .tools import CHROMIUM_ARGS, require_chromium

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "dashboard.png"
EXPECTED_FAILURES = (
    "the server responded with a status of 401 (Unauthorized)",
    "net::ERR_CONNECTION_REFUSED",
)
# Browser-side waits; generous, since a reconnect includes a backoff delay.
WAIT_MS = 20_000


@contextmanager
def hub_process(port: int = 0, extra: Sequence[str] = ()) -> Iterator[HubProcess]:
    """A :class:`HubProcess` for the block, stopped with SIGTERM at its end."""
    hub = HubProcess(port, extra=extra)
    try:
        yield hub
    finally:
        assert hub.stop() == 0, hub.output


def run(run_id: str, test: str, **extra: Any) -> dict[str, Any]:
    """A notify body for one run: its id, its test and ``extra`` fields."""
    return {"run_id": run_id, "test_name": test, **extra}


def started(seconds_ago: float) -> str:
    """A ``started_at`` that many seconds ago, so that a run's start and elapsed time agree."""
    moment = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
    return moment.isoformat().replace("+00:00", "Z")


def progress(run_id: str, test: str, fraction: float, rps: float = 500.0) -> dict[str, Any]:
    """A ``run_progress`` body for a two-minute, 60,000-request run ``fraction`` done (500
    requests a second on average; ``rps`` is the current rate)."""
    return run(
        run_id,
        test,
        progress=fraction,
        elapsed_s=round(120 * fraction, 1),
        requests_done=int(60_000 * fraction),
        current_rps=rps,
        error_rate=0.002,
    )


def regression(
    regression_id: str, run_id: str, test: str, severity: str, **fields: Any
) -> dict[str, Any]:
    """A ``regression_detected`` body: an 18.4% p95 regression unless ``fields`` differ."""
    return {
        "regression": {
            "id": regression_id,
            "run_id": run_id,
            "baseline_run_id": "base-7",
            "client": "geth",
            "metric": "p95_latency_ms",
            "method": "eth_call",
            "severity": severity,
            "percent_change": 18.4,
            "baseline_value": 41.2,
            "current_value": 48.8,
            "is_significant": True,
            "p_value": 0.003,
            **fields,
        },
        "run": {"id": run_id, "test_name": test, "git_commit": "4f2a9c1e7b"},
    }


def populate(hub: HubProcess) -> None:
    """A few runs in every state, regressions of each severity and some results."""
    hub.notify(
        "run_started",
        run(
            "r-218",
            "debug_traceTransaction",
            git_branch="main",
            git_commit="9be41c07d2",
            clients=["geth", "reth"],
            methods=["debug_traceTransaction"],
            planned_requests=60_000,
            started_at=started(37),
        ),
    )
    hub.notify("run_progress", progress("r-218", "debug_traceTransaction", 0.31, rps=494.0))
    hub.notify(
        "run_started",
        run(
            "r-215",
            "eth_getLogs",
            git_branch="main",
            planned_requests=60_000,
            started_at=started(64),
        ),
    )
    hub.notify("run_progress", progress("r-215", "eth_getLogs", 1.0, rps=960.0))
    hub.notify(
        "run_complete",
        run(
            "r-215",
            "eth_getLogs",
            duration_s=64.2,
            total_requests=60_000,
            total_errors=14,
            error_rate=0.00023,
        ),
    )
    hub.notify(
        "run_started",
        run("r-216", "eth_estimateGas", git_branch="feat/cache", started_at=started(51)),
    )
    hub.notify("run_progress", progress("r-216", "eth_estimateGas", 0.42, rps=488.0))
    hub.notify(
        "run_failed",
        run(
            "r-216",
            "eth_estimateGas",
            error="client reth stopped answering (timeout after 30 s)",
            elapsed_s=51.0,
        ),
    )
    hub.notify(
        "new_run",
        {
            "run": {
                "id": "r-215",
                "test_name": "eth_getLogs",
                "git_commit": "77c0de1f00",
                "total_requests": 60_000,
                "overall_error_rate": 0.00023,
                "p95_latency_ms": 38.5,
                "best_client": "reth",
            }
        },
    )
    hub.notify(
        "baseline_updated",
        {"baseline_name": "main", "run_id": "r-215", "test_name": "eth_getLogs"},
    )
    hub.notify(
        "analysis_complete",
        run(
            "r-215",
            "eth_getLogs",
            analysis_results={"regressions": 0, "improvements": 2, "verdict": "faster"},
        ),
    )
    hub.notify(
        "regression_detected",
        regression(
            "g-3",
            "r-212",
            "eth_getBalance",
            "low",
            percent_change=3.1,
            metric="avg_latency_ms",
            baseline_value=12.0,
            current_value=12.37,
        ),
    )
    hub.notify(
        "regression_detected",
        regression(
            "g-4",
            "r-213",
            "eth_getLogs",
            "medium",
            percent_change=7.9,
            current_value=44.45,
            client="reth",
        ),
    )
    hub.notify(
        "regression_detected",
        regression(
            "g-5",
            "r-214",
            "eth_call",
            "critical",
            percent_change=61.0,
            metric="error_rate",
            baseline_value=0.01,
            current_value=0.0161,
        ),
    )


@pytest.fixture(scope="session")
def chromium(pytestconfig: pytest.Config) -> str:
    return require_chromium(pytestconfig)


@pytest.fixture
def page(chromium: str) -> Iterator[Page]:
    """A page of headless Chromium; an uncaught exception or a failed load in it (a 404
    asset) fails the test."""
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            # Notifications granted, as a person who pressed "allow" would have them; the
            # dashboard still raises none until its Alerts button is pressed.
            page = browser.new_page(
                viewport={"width": 1280, "height": 900}, permissions=["notifications"]
            )
            errors: list[str] = []

            def page_error(error: Error) -> None:
                errors.append(str(error))

            def console(message: ConsoleMessage) -> None:
                # Chromium logs each refused reconnect while the hub restarts, and the page's
                # plain request asking why it could not connect (refused too while the hub
                # is down, 401 from a hub that wants a token): expected.
                text = message.text
                if message.type == "error" and not (
                    text.startswith("WebSocket connection to") or text.endswith(EXPECTED_FAILURES)
                ):
                    errors.append(text)

            page.on("pageerror", page_error)
            page.on("console", console)
            yield page
            assert errors == [], errors
        finally:
            browser.close()


def test_dashboard_live_view_filter_and_reconnect(page: Page) -> None:
    _exercise(page)


def test_the_dashboard_says_when_events_were_lost_between_hubs(
    page: Page, redis_server: RedisServer
) -> None:
    with hub_process(extra=["--redis-url", redis_server.url]) as hub:
        page.goto(f"http://127.0.0.1:{hub.port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        # Twenty messages in one transaction that keeps the last five: the hub can read
        # only those, and fifteen are gone before it could.
        writer = Redis.from_url(redis_server.url)
        try:
            with writer.pipeline(transaction=True) as pipe:
                for n in range(20):
                    pipe.xadd(
                        "wshub:messages",
                        {"type": "m", "data": str(n)},
                        maxlen=5,
                        approximate=False,
                    )
                pipe.execute()
        finally:
            writer.close()
        notice = page.get_by_test_id("resume-notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text("15 events were lost on the way to this page")


def test_chromium_takes_the_hubs_compressed_frames(page: Page) -> None:
    with hub_process(extra=["--compression", "deflate"]) as hub:
        page.goto(f"http://127.0.0.1:{hub.port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        # What the browser itself says it negotiated.
        extensions = page.evaluate(
            """url => new Promise((resolve, reject) => {
                const ws = new WebSocket(url);
                ws.onopen = () => { resolve(ws.extensions); ws.close(); };
                ws.onerror = () => reject(new Error("no connection"));
            })""",
            f"ws://127.0.0.1:{hub.port}/api/ws",
        )
        assert extensions == (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            f"server_max_window_bits={WINDOW_BITS}"
        )
        # Once that connection is gone, the dashboard's own is the one compressed client.
        deadline = time.monotonic() + WAIT_MS / 1000
        while (before := hub.stats())["clients"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (before["clients"], before["compressed_clients"]) == (1, 1)
        hub.notify("run_started", run("r-300", "eth_call", planned_requests=60_000))
        hub.notify("run_progress", progress("r-300", "eth_call", 0.4))
        hub.notify("regression_detected", regression("g-3", "r-300", "eth_call", "high"))
        row = page.locator('[data-testid="run"][data-run-id="r-300"]')
        expect(row.get_by_test_id("run-progress")).to_have_attribute("aria-valuenow", "40")
        item = page.locator('[data-testid="regression"][data-run-id="r-300"]')
        expect(item.get_by_test_id("regression-change")).to_contain_text("+18.4%")
        assert hub.stats()["messages_compressed"] - before["messages_compressed"] == 3


def test_a_page_opened_during_a_run_shows_it_and_the_recent_regressions_at_once(
    page: Page,
) -> None:
    with hub_process() as hub:
        populate(hub)
        hub.notify("run_progress", progress("r-218", "debug_traceTransaction", 0.55, rps=501.0))
        page.goto(f"http://127.0.0.1:{hub.port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        # The run in progress, at its latest progress; the finished ones in their final state.
        row = page.locator('[data-testid="run"][data-run-id="r-218"]')
        expect(row.get_by_test_id("run-state")).to_have_text("running")
        expect(row.get_by_test_id("run-progress")).to_have_attribute("aria-valuenow", "55")
        expect(row.get_by_test_id("run-rps")).to_have_text("501/s")
        expect(page.locator('[data-run-id="r-216"][data-state="failed"]')).to_be_visible()
        expect(page.locator('[data-run-id="r-215"][data-state="complete"]')).to_be_visible()
        expect(page.get_by_test_id("runs-count")).to_have_text("1 running")
        # The recent events: three regressions, newest first, and the results feed.
        expect(page.get_by_test_id("regression")).to_have_count(3)
        expect(page.get_by_test_id("regression").first).to_have_attribute(
            "data-severity", "critical"
        )
        expect(page.get_by_test_id("analysis")).to_have_count(1)
        expect(page.get_by_test_id("resume-notice")).to_be_hidden()
        # Old news raises no alert; the next live critical regression does.
        expect(page).to_have_title("wshub · live benchmarks")
        hub.notify("regression_detected", regression("g-7", "r-218", "eth_call", "critical"))
        expect(page.get_by_test_id("regression")).to_have_count(4)
        expect(page).to_have_title(re.compile(r"^\(1\) "))
        # Following a test shows what it adds, each message once.
        page.get_by_test_id("filter").fill("eth_getLogs")
        page.get_by_test_id("filter-apply").click()
        expect(page.get_by_test_id("topics")).to_have_text("test:eth_getLogs")
        page.get_by_test_id("filter-clear").click()
        expect(page.get_by_test_id("topics")).to_have_text("*")
        expect(page.get_by_test_id("regression")).to_have_count(4)


def _exercise(page: Page) -> None:
    """What a person watching would see, step by step (the test's body, in one browser)."""
    status = page.get_by_test_id("status")
    hub = HubProcess()
    try:
        port = hub.port
        page.goto(f"http://127.0.0.1:{port}/")
        expect(status).to_have_attribute("data-status", "open")
        expect(page.get_by_test_id("status-text")).to_have_text("Live")
        expect(page.get_by_test_id("topics")).to_have_text("*")
        expect(page.get_by_test_id("resume-notice")).to_be_hidden()

        # A run: a row on run_started, its bar following run_progress.
        assert (
            hub.notify(
                "run_started",
                run("r-220", "eth_call", planned_requests=60_000, started_at=started(72)),
            )
            == 1
        )
        row = page.locator('[data-testid="run"][data-run-id="r-220"]')
        expect(row).to_be_visible()
        expect(row.get_by_test_id("run-state")).to_have_text("running")
        hub.notify("run_progress", progress("r-220", "eth_call", 0.25))
        expect(row.get_by_test_id("run-progress")).to_have_attribute("aria-valuenow", "25")
        hub.notify("run_progress", progress("r-220", "eth_call", 0.6, rps=512.5))
        expect(row.get_by_test_id("run-progress")).to_have_attribute("aria-valuenow", "60")
        expect(row.get_by_test_id("run-percent")).to_have_text("60%")
        expect(row.get_by_test_id("run-rps")).to_have_text("512.5/s")
        expect(row.get_by_test_id("run-elapsed")).to_have_text("1m 12s")
        expect(page.get_by_test_id("rate")).not_to_have_text("0.0")

        # A regression, with its severity.
        hub.notify("regression_detected", regression("g-1", "r-220", "eth_call", "high"))
        item = page.locator('[data-testid="regression"][data-run-id="r-220"]')
        expect(item).to_have_attribute("data-severity", "high")
        expect(item.get_by_test_id("regression-severity")).to_have_text("high")
        expect(item.get_by_test_id("regression-change")).to_contain_text("+18.4%")

        populate(hub)
        expect(page.locator('[data-run-id="r-216"][data-state="failed"]')).to_be_visible()
        expect(page.locator('[data-run-id="r-215"][data-state="complete"]')).to_be_visible()
        expect(page.get_by_test_id("regression")).to_have_count(4)
        expect(page.get_by_test_id("analysis")).to_have_count(1)

        if os.environ.get("WSHUB_SCREENSHOT") == "1":
            page.wait_for_timeout(600)  # the bars' width transition
            page.screenshot(path=str(SCREENSHOT), full_page=True)

        # A regression the runner sent without its numbers says so: n/a, never 0%.
        bare = regression("g-6", "r-222", "eth_call", "critical")
        for key in ("percent_change", "baseline_value", "current_value"):
            del bare["regression"][key]
        hub.notify("regression_detected", bare)
        change = page.locator('[data-testid="regression"][data-run-id="r-222"]').get_by_test_id(
            "regression-change"
        )
        expect(change).to_have_text(re.compile(r"^n/a\s+·\s+n/a → n/a$"))

        # The filter: only eth_call from now on; other tests' rows are hidden.
        page.get_by_test_id("filter").fill("eth_call")
        page.get_by_test_id("filter-apply").click()
        expect(page.get_by_test_id("topics")).to_have_text("test:eth_call")
        expect(page.locator('[data-run-id="r-218"]')).to_be_hidden()
        expect(row).to_be_visible()
        assert "test=eth_call" in page.url
        hub.notify("run_started", run("r-other", "eth_getBalance"))
        # Delivery is in publish order: once the later eth_call run shows, the other would
        # have shown before it, had the page still been subscribed to it.
        hub.notify("run_started", run("r-221", "eth_call"))
        expect(page.locator('[data-run-id="r-221"]')).to_be_visible()
        expect(page.locator('[data-run-id="r-other"]')).to_have_count(0)

        # The hub restarts on the same port: reconnecting, then open, still filtered.
        assert hub.stop() == 0, hub.output
        expect(status).to_have_attribute("data-status", "reconnecting")
        expect(page.get_by_test_id("status-text")).to_contain_text("Reconnecting")
    finally:
        hub.stop()
    with hub_process(port) as restarted:
        expect(status).to_have_attribute("data-status", "open")
        expect(page.get_by_test_id("topics")).to_have_text("test:eth_call")
        # The new hub's history does not know the page's last event: a calm notice that
        # what the page shows is the hub's state now.
        notice = page.get_by_test_id("resume-notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text(
            "could not replay the events missed while disconnected (unknown message id)"
        )
        page.get_by_test_id("resume-notice-dismiss").click()
        expect(notice).to_be_hidden()
        restarted.notify("run_started", run("r-230", "eth_call"))
        restarted.notify("run_progress", progress("r-230", "eth_call", 0.1))
        after = page.locator('[data-testid="run"][data-run-id="r-230"]')
        expect(after.get_by_test_id("run-progress")).to_have_attribute("aria-valuenow", "10")

        # Clearing the filter goes back to everything.
        page.get_by_test_id("filter-clear").click()
        expect(page.get_by_test_id("topics")).to_have_text("*")
        expect(page.locator('[data-run-id="r-218"]')).to_be_visible()
        restarted.notify("run_started", run("r-231", "eth_getBalance"))
        expect(page.locator('[data-run-id="r-231"]')).to_be_visible()


def test_the_dashboard_reads_the_json_bench_event_format(page: Page) -> None:
    with hub_process(extra=["--event-format", "json-bench"]) as hub:
        page.goto(f"http://127.0.0.1:{hub.port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        run = {
            "id": "run-42",
            "test_name": "eth_call",
            "total_requests": 60_000,
            "p95_latency_ms": 38.5,
            "best_client": "reth",
        }
        hub.notify("new_run", {"run": run})
        stored = page.get_by_test_id("new-run")
        expect(stored).to_contain_text("run run-42")
        expect(stored).to_contain_text("p95 38.5 ms")
        hub.notify("regression_detected", regression("g-7", "run-42", "eth_call", "high"))
        item = page.locator('[data-testid="regression"][data-run-id="run-42"]')
        expect(item).to_have_attribute("data-severity", "high")  # json-bench's "major"
        expect(item.get_by_test_id("regression-severity")).to_have_text("major")
        expect(item.get_by_test_id("regression-change")).to_contain_text("+18.4%")
        expect(item).to_contain_text("p95_latency_ms")
        body = {"baseline_name": "main", "run_id": "run-42", "test_name": "eth_call"}
        hub.notify("baseline_updated", body)
        expect(page.get_by_test_id("baseline")).to_contain_text("Baseline “main” updated")
        expect(page.get_by_test_id("baseline")).to_contain_text("now run run-42")


def run_row(page: Page, run_id: str) -> Locator:
    return page.locator(f'[data-testid="run"][data-run-id="{run_id}"]')


def test_a_finished_run_is_coloured_by_its_final_figures(page: Page) -> None:
    with hub_process() as hub:
        page.goto(f"http://127.0.0.1:{hub.port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        hub.notify("run_started", run("r-1", "eth_call", planned_requests=60_000))
        hub.notify("run_progress", {**progress("r-1", "eth_call", 0.2), "error_rate": 0.015})
        errors = run_row(page, "r-1").get_by_test_id("run-errors")
        expect(errors).to_have_text("1.50%")
        expect(errors).to_have_class(re.compile(r"\bwarn\b"))
        complete = run("r-1", "eth_call", duration_s=120.0, total_requests=60_000)
        hub.notify("run_complete", {**complete, "total_errors": 420, "error_rate": 0.007})
        expect(run_row(page, "r-1")).to_have_attribute("data-state", "complete")
        expect(errors).to_have_text("0.70%")
        expect(errors).not_to_have_class(re.compile(r"\bwarn\b"))


def test_a_run_that_goes_silent_is_stale_until_it_speaks_again(page: Page) -> None:
    # The page's clock is Playwright's: a minute passes without waiting one.
    page.clock.install()
    with hub_process() as hub:
        page.goto(f"http://127.0.0.1:{hub.port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        hub.notify("run_started", run("r-1", "eth_call"))
        hub.notify("run_started", run("r-2", "eth_getLogs"))
        hub.notify("run_complete", run("r-2", "eth_getLogs", duration_s=5.0))
        row = run_row(page, "r-1")
        expect(row).to_have_attribute("data-state", "running")
        expect(run_row(page, "r-2")).to_have_attribute("data-state", "complete")
        expect(page.get_by_test_id("runs-count")).to_have_text("1 running")
        page.clock.fast_forward(65_000)
        expect(row).to_have_attribute("data-state", "stale")
        expect(row.get_by_test_id("run-state")).to_have_text("no updates")
        expect(run_row(page, "r-2")).to_have_attribute("data-state", "complete")
        expect(page.get_by_test_id("runs-count")).to_have_text("0 running · 1 stale")
        # The page may have reconnected meanwhile (the jump looks like a dead link to it).
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        hub.notify("run_progress", progress("r-1", "eth_call", 0.5))
        expect(row).to_have_attribute("data-state", "running")
        expect(page.get_by_test_id("runs-count")).to_have_text("1 running")


def test_the_page_dims_while_away_and_reconnects_at_once_when_asked(page: Page) -> None:
    page.clock.install()
    board = page.locator("main.board")
    button = page.get_by_test_id("reconnect-now")
    hub = HubProcess()
    try:
        port = hub.port
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        expect(button).to_be_hidden()
        assert board.evaluate("element => getComputedStyle(element).opacity") == "1"
        assert hub.stop() == 0, hub.output
    finally:
        hub.stop()
    expect(page.locator("body")).to_have_attribute("data-connection", "reconnecting")
    expect(button).to_be_visible()
    expect(board).to_have_css("opacity", "0.45")
    # Time stops on the page: no scheduled retry can fire, only the button brings it back.
    page.clock.pause_at(datetime.datetime.now() + datetime.timedelta(minutes=1))
    expect(button).to_be_visible()
    with hub_process(port):
        button.click()
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        expect(page.locator("body")).to_have_attribute("data-connection", "open")
        expect(button).to_be_hidden()
        expect(board).to_have_css("opacity", "1")
        page.clock.resume()


def test_the_dashboard_takes_a_token_from_its_address_and_explains_a_refusal(
    page: Page, tmp_path: pathlib.Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    status = page.get_by_test_id("status")
    notice = page.get_by_test_id("access-notice")
    flags = ["--auth-required", "--auth-secret-file", str(secret_file), "--auth-leeway", "0"]
    with hub_process(extra=[*flags, "--auth-expiry-grace", "1"]) as hub:
        home = f"http://127.0.0.1:{hub.port}/"
        # No token: the page says what the hub wants, and stops asking.
        page.goto(home)
        expect(page.get_by_test_id("status-text")).to_have_text("Not authorized")
        expect(status).to_have_attribute("data-status", "refused")
        expect(notice).to_contain_text("This hub requires a subscriber token")
        expect(page.get_by_test_id("reconnect-now")).to_be_hidden()

        # Team A's token: its test is live; another team's is refused by name and the page
        # keeps following its own.
        token = mint_token(SECRET, sub="team-a", topics=["test:team-a-*"], ttl=3600)
        page.goto(f"{home}?token={token}&test=team-a-eth")
        expect(status).to_have_attribute("data-status", "open")
        expect(notice).to_be_hidden()
        expect(page.get_by_test_id("topics")).to_have_text("test:team-a-eth")
        page.get_by_test_id("filter").fill("team-b-eth")
        page.get_by_test_id("filter-apply").click()
        expect(notice).to_contain_text("does not allow test:team-b-eth; it allows test:team-a-*")
        expect(page.get_by_test_id("filter")).to_have_value("team-a-eth")
        hub.notify("run_started", run("r-a1", "team-a-eth"))
        expect(page.locator('[data-run-id="r-a1"]')).to_be_visible()
        expect(page.get_by_test_id("topics")).to_have_text("test:team-a-eth")
        # A test the token grants: followed, and the notice goes.
        page.get_by_test_id("filter").fill("team-a-trace")
        page.get_by_test_id("filter-apply").click()
        expect(page.get_by_test_id("topics")).to_have_text("test:team-a-trace")
        expect(notice).to_be_hidden()

        # Every event (*) is not granted to team A either.
        page.goto(f"{home}?token={token}")
        expect(notice).to_contain_text("does not allow every event (*)")

        # A token that expires while the page is open: told, disconnected after the grace
        # period, and the reconnection refused with the reason.
        # Long enough for a slow machine to open the page before it expires.
        short = mint_token(SECRET, sub="team-a", topics=["*"], ttl=5)
        page.goto(f"{home}?token={short}")
        expect(status).to_have_attribute("data-status", "open")
        expect(notice).to_contain_text("This page's token has expired")
        expect(page.get_by_test_id("status-text")).to_have_text("Not authorized")
        expect(notice).to_contain_text("refused this page's token: the token has expired")
        assert token not in hub.output and short not in hub.output


# Records each notification the page raises, then raises it for real.
RECORD_NOTIFICATIONS = """
window.raised = [];
window.Notification = class extends window.Notification {
  constructor(title, options) {
    super(title, options);
    window.raised.push({ title, body: options?.body ?? "" });
  }
};
"""


def test_alerts_for_critical_regressions_and_failed_runs(page: Page) -> None:
    page.add_init_script(RECORD_NOTIFICATIONS)
    alerts = page.get_by_test_id("alerts")
    with hub_process() as hub:
        page.goto(f"http://127.0.0.1:{hub.port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        title = page.title()
        expect(alerts).to_have_text("Alerts off")

        # Not opted in: the title counts the alert, the browser shows nothing.
        hub.notify("regression_detected", regression("g-1", "r-1", "eth_call", "critical"))
        expect(page).to_have_title(f"(1) {title}")
        assert page.evaluate("window.raised") == []

        alerts.click()  # touching the page also clears the count
        expect(alerts).to_have_text("Alerts on")
        expect(alerts).to_have_attribute("aria-pressed", "true")
        expect(page).to_have_title(title)
        hub.notify("regression_detected", regression("g-2", "r-1", "eth_call", "high"))
        hub.notify("regression_detected", regression("g-3", "r-1", "eth_call", "critical"))
        hub.notify("run_started", run("r-2", "eth_getLogs"))
        hub.notify("run_failed", run("r-2", "eth_getLogs", error="node crashed"))
        expect(page).to_have_title(f"(2) {title}")
        raised = page.evaluate("window.raised")
        assert raised == [
            {
                "title": "Critical regression: p95_latency_ms +18.4%",
                "body": "client geth · method eth_call · test eth_call · run r-1 · 4f2a9c1",
            },
            {"title": "Run failed: eth_getLogs", "body": "run r-2 · node crashed"},
        ]
        page.keyboard.press("Shift")
        expect(page).to_have_title(title)

        # The choice outlives the page.
        page.reload()
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        expect(alerts).to_have_text("Alerts on")
        alerts.click()
        expect(alerts).to_have_text("Alerts off")
        hub.notify("run_started", run("r-3", "eth_call"))
        hub.notify("run_failed", run("r-3", "eth_call", error="timeout"))
        expect(page).to_have_title(f"(1) {title}")
        assert page.evaluate("window.raised") == []


# The words of the page that the layout split over two lines.
BROKEN_WORDS = """() => {
  const broken = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (const word of node.textContent.matchAll(/\\S+/g)) {
      const range = document.createRange();
      range.setStart(node, word.index);
      range.setEnd(node, word.index + word[0].length);
      const rects = [...range.getClientRects()].filter((rect) => rect.width > 0);
      const lines = new Set(rects.map((rect) => Math.round(rect.top)));
      if (lines.size > 1) broken.push(word[0]);
    }
  }
  return broken;
}"""


def test_a_narrow_screen_shows_regressions_first_and_breaks_no_word(page: Page) -> None:
    page.set_viewport_size({"width": 400, "height": 900})
    with hub_process() as hub:
        page.goto(f"http://127.0.0.1:{hub.port}/")
        expect(page.get_by_test_id("status")).to_have_attribute("data-status", "open")
        hub.notify("run_started", run("r-220", "eth_call", planned_requests=60_000))
        hub.notify("run_progress", progress("r-220", "eth_call", 0.6, rps=512.5))
        hub.notify("regression_detected", regression("g-1", "r-220", "eth_call", "high"))
        populate(hub)
        expect(page.get_by_test_id("regression")).to_have_count(4)
        expect(page.get_by_test_id("analysis")).to_have_count(1)
        top = {
            name: page.get_by_test_id(name).evaluate("e => e.getBoundingClientRect().top")
            for name in ("regressions", "runs", "activity")
        }
        assert top["regressions"] < top["runs"] < top["activity"], top
        assert page.evaluate(BROKEN_WORDS) == []
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, f"the page is {width} px wide: it scrolls sideways"
