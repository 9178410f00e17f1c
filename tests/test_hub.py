"""The hub over real sockets: greeting, subscriptions, delivery, notifications, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

import wshub
import wshub.clients
import wshub.runner as runner

from .helpers import client, recv_json, send_json, subscribe, wait_until

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def message_id(message: dict[str, Any]) -> tuple[int, int]:
    milliseconds, sequence = message["id"].split("-")
    return int(milliseconds), int(sequence)


async def test_greeting_names_client_and_default_topics(hub_server: Any) -> None:
    async with hub_server() as served, client(served.url) as (_, hello):
        client_id = hello["data"]["client_id"]
        assert re.fullmatch(r"[0-9a-f]{16}", client_id)
        assert hello["client_id"] == client_id
        assert hello["data"] == {"client_id": client_id, "status": "connected", "topics": ["*"]}
        assert RFC3339_UTC.match(hello["timestamp"])
        assert "id" not in hello and "error" not in hello
        assert [info["id"] for info in served.hub.client_info()] == [client_id]


async def test_url_topics_replace_default_topics(hub_server: Any) -> None:
    async with (
        hub_server() as served,
        client(served.url + "?topics=run:1,test:eth_call") as (
            ws,
            hello,
        ),
    ):
        assert hello["data"]["topics"] == ["run:1", "test:eth_call"]
        assert served.hub.broadcast_to_subscribers("x", 1, ["other"]) == 0
        assert served.hub.broadcast_to_subscribers("x", 2, ["run:1"]) == 1
        assert (await recv_json(ws))["data"] == 2


async def test_bad_url_topics_get_an_error_and_no_subscriptions(hub_server: Any) -> None:
    long_topic = "t" * 257
    async with (
        hub_server() as served,
        client(served.url + f"?topics={long_topic}") as (
            ws,
            hello,
        ),
    ):
        assert hello["data"]["topics"] == []
        error = await recv_json(ws)
        assert error["type"] == "error" and error["error"]["code"] == 400
        assert "256" in error["error"]["message"]
        assert served.hub.broadcast_to_subscribers("x", 1, ["anything"]) == 0


async def test_subscribe_and_unsubscribe_answer_with_the_whole_sorted_set(
    hub_server: Any,
) -> None:
    async with hub_server(default_topics=()) as served, client(served.url) as (ws, hello):
        assert hello["data"]["topics"] == []
        assert await subscribe(ws, "b", "a", "b") == ["a", "b"]
        assert await subscribe(ws, "c") == ["a", "b", "c"]
        await send_json(ws, {"type": "unsubscribe", "data": {"topics": ["a", "zzz"]}})
        reply = await recv_json(ws)
        assert reply["type"] == "unsubscribed"
        assert reply["data"] == {"topics": ["b", "c"]}
        assert reply["client_id"] == hello["client_id"]
        [info] = served.hub.client_info()
        assert info["subscriptions"] == ["b", "c"]


async def test_ping_gets_pong_and_pong_updates_last_ping(hub_server: Any) -> None:
    async with hub_server() as served, client(served.url) as (ws, hello):
        assert served.hub.client_info()[0]["last_ping"] is None
        await send_json(ws, {"type": "ping"})
        pong = await recv_json(ws)
        assert pong["type"] == "pong" and pong["client_id"] == hello["client_id"]
        first = served.hub.client_info()[0]["last_ping"]
        assert RFC3339_UTC.match(first)
        await send_json(ws, {"type": "pong"})
        await send_json(ws, {"type": "ping"})  # answered after the pong was handled
        await recv_json(ws)
        assert served.hub.client_info()[0]["last_ping"] >= first


async def test_broadcast_to_all_reaches_clients_without_subscriptions(hub_server: Any) -> None:
    async with (
        hub_server(default_topics=()) as served,
        client(served.url) as (a, _),
        client(served.url) as (b, _),
    ):
        assert served.hub.broadcast_to_all("announcement", {"text": "hello"}) == 2
        for ws in (a, b):
            message = await recv_json(ws)
            assert message["type"] == "announcement"
            assert message["data"] == {"text": "hello"}
            assert RFC3339_UTC.match(message["timestamp"])
            assert "client_id" not in message


async def test_topic_message_reaches_each_matching_client_exactly_once(hub_server: Any) -> None:
    async with hub_server(default_topics=()) as served:
        hub = served.hub
        async with (
            client(served.url) as (both, _),
            client(served.url) as (
                wildcard,
                _,
            ),
            client(served.url) as (other, _),
        ):
            await subscribe(both, "run:1", "test:eth_call")
            await subscribe(wildcard, "*", "run:1")
            await subscribe(other, "run:2")
            assert hub.broadcast_to_subscribers("event", "A", ["run:1", "test:eth_call"]) == 2
            assert hub.broadcast_to_subscribers("event", "B", ["nobody"]) == 1
            # A sentinel to everyone: whatever arrives before it was delivered to that client.
            hub.broadcast_to_all("sentinel")
            assert [m["data"] for m in await _until_sentinel(both)] == ["A"]
            assert [m["data"] for m in await _until_sentinel(wildcard)] == ["A", "B"]
            assert await _until_sentinel(other) == []


async def _until_sentinel(ws: Any) -> list[dict[str, Any]]:
    received = []
    while (message := await recv_json(ws))["type"] != "sentinel":
        received.append(message)
    return received


async def test_each_client_sees_messages_in_publish_order_with_increasing_ids(
    hub_server: Any,
) -> None:
    async with (
        hub_server() as served,
        client(served.url) as (a, _),
        client(served.url) as (
            b,
            _,
        ),
    ):
        hub = served.hub
        for batch in range(5):
            for index in range(40):
                if index % 2:
                    hub.broadcast_to_all("n", batch * 40 + index)
                else:
                    hub.broadcast_to_subscribers("n", batch * 40 + index, ["t"])
            await asyncio.sleep(0)  # let the flush run between bursts
        for ws in (a, b):
            messages = [await recv_json(ws) for _ in range(200)]
            assert [m["data"] for m in messages] == list(range(200))
            ids = [message_id(m) for m in messages]
            assert ids == sorted(ids) and len(set(ids)) == 200


async def test_burst_leaves_in_one_write_per_client(hub_server: Any) -> None:
    async with (
        hub_server() as served,
        client(served.url) as (a, _),
        client(served.url) as (
            b,
            _,
        ),
    ):
        hub = served.hub
        writes = hub.stats()["writes"]
        for index in range(100):
            hub.broadcast_to_all("n", index)
        for ws in (a, b):
            assert [(await recv_json(ws))["data"] for _ in range(100)] == list(range(100))
        assert hub.stats()["writes"] - writes == 2


async def test_flush_interval_coalesces_across_loop_iterations(hub_server: Any) -> None:
    async with hub_server(flush_interval=0.2) as served, client(served.url) as (ws, _):
        hub = served.hub
        writes = hub.stats()["writes"]
        for index in range(3):
            hub.broadcast_to_all("n", index)
            await asyncio.sleep(0)
        assert hub.stats()["writes"] == writes  # still coalescing
        assert [(await recv_json(ws))["data"] for _ in range(3)] == [0, 1, 2]
        assert hub.stats()["writes"] - writes == 1


async def test_notifications_carry_runner_payloads_and_topics(hub_server: Any) -> None:
    run = wshub.HistoricRun(
        id="run-7",
        timestamp="2026-11-25T10:00:00Z",
        git_commit="abc123",
        git_branch="main",
        test_name="eth_call",
        total_requests=1000,
        total_errors=3,
        overall_error_rate=0.003,
        avg_latency_ms=1.5,
        p95_latency_ms=3.0,
        best_client="geth",
        performance_scores={"geth": 98.5},
    )
    regression = {
        "id": "reg-1",
        "run_id": "run-7",
        "baseline_run_id": "run-3",
        "client": "geth",
        "metric": "p95_latency_ms",
        "method": "eth_call",
        "baseline_value": 2.0,
        "current_value": 3.0,
        "percent_change": 50.0,
        "absolute_change": 1.0,
        "severity": "high",
        "is_significant": True,
        "p_value": 0.01,
        "detected_at": "2026-11-25T10:01:00Z",
    }
    async with (
        hub_server(default_topics=("test:eth_call",)) as served,
        client(served.url) as (
            ws,
            _,
        ),
    ):
        hub = served.hub
        assert hub.notify_new_run(run) == 1
        assert hub.notify_regression(regression, run) == 1
        assert hub.notify_baseline_updated("main", "run-7", "eth_call") == 1
        assert hub.notify_analysis_complete("run-7", "eth_call", {"trend": "flat"}) == 1
        assert hub.notify_run_started("run-8", "eth_call", git_commit="def") == 1
        assert (
            hub.notify_run_progress(
                "run-8",
                "eth_call",
                0.25,
                elapsed_s=5.0,
                requests_done=250,
                current_rps=50.0,
                error_rate=0.0,
            )
            == 1
        )
        assert hub.notify_run_complete("run-8", "eth_call", duration_s=20.0) == 1
        assert hub.notify_run_failed("run-9", "eth_call", "node crashed") == 1
        assert hub.notify_run_failed("run-9", "other_test", "node crashed") == 0

        new_run = await recv_json(ws)
        assert new_run["type"] == "new_run"
        assert new_run["data"] == {
            "run_id": "run-7",
            "test_name": "eth_call",
            "timestamp": "2026-11-25T10:00:00Z",
            "git_commit": "abc123",
            "status": "completed",
            "summary": {
                "total_requests": 1000,
                "total_errors": 3,
                "overall_error_rate": 0.003,
                "avg_latency_ms": 1.5,
                "p95_latency_ms": 3.0,
                "best_client": "geth",
                "performance_scores": {"geth": 98.5},
            },
        }
        detected = await recv_json(ws)
        assert detected["type"] == "regression_detected"
        expected = {key: regression[key] for key in regression if key != "id"}
        expected["regression_id"] = "reg-1"
        expected["test_name"] = "eth_call"  # at the top, as in every other event
        expected["run_info"] = {
            "test_name": "eth_call",
            "git_commit": "abc123",
            "timestamp": "2026-11-25T10:00:00Z",
        }
        assert detected["data"] == expected
        baseline = await recv_json(ws)
        assert baseline["type"] == "baseline_updated"
        assert {k: baseline["data"][k] for k in ("baseline_name", "run_id", "test_name")} == {
            "baseline_name": "main",
            "run_id": "run-7",
            "test_name": "eth_call",
        }
        assert RFC3339_UTC.match(baseline["data"]["updated_at"])
        analysis = await recv_json(ws)
        assert analysis["data"]["analysis_results"] == {"trend": "flat"}
        started = await recv_json(ws)
        assert started["type"] == "run_started" and started["data"]["git_commit"] == "def"
        progress = await recv_json(ws)
        assert progress["data"] == {
            "run_id": "run-8",
            "test_name": "eth_call",
            "progress": 0.25,
            "elapsed_s": 5.0,
            "requests_done": 250,
            "current_rps": 50.0,
            "error_rate": 0.0,
        }
        complete = await recv_json(ws)
        assert complete["type"] == "run_complete" and complete["data"]["duration_s"] == 20.0
        failed = await recv_json(ws)
        assert failed["type"] == "run_failed" and failed["data"]["error"] == "node crashed"


async def test_notifications_publish_to_type_run_and_test_topics(hub_server: Any) -> None:
    async with hub_server(default_topics=()) as served:
        hub = served.hub
        async with (
            client(served.url + "?topics=run_progress") as (by_type, _),
            client(served.url + "?topics=run:r1") as (by_run, _),
            client(served.url + "?topics=test:t1") as (by_test, _),
        ):
            count = hub.notify_run_progress(
                "r1", "t1", 1.0, elapsed_s=1.0, requests_done=1, current_rps=1.0, error_rate=0.0
            )
            assert count == 3
            for ws in (by_type, by_run, by_test):
                assert (await recv_json(ws))["type"] == "run_progress"


async def test_bad_publish_arguments_raise_and_publish_nothing(hub_server: Any) -> None:
    async with hub_server() as served, client(served.url) as (ws, _):
        hub = served.hub
        with pytest.raises(TypeError):
            hub.broadcast_to_all("x", {"not json": object()})
        with pytest.raises(TypeError):
            hub.broadcast_to_subscribers("x", 1, [1, 2])
        for reserved in ("connection", "error", "subscribed", "pong", "disconnection"):
            with pytest.raises(ValueError, match="reserved"):
                hub.broadcast_to_all(reserved, {})
        with pytest.raises(ValueError, match="progress"):
            hub.notify_run_progress(
                "r", "t", 1.5, elapsed_s=0, requests_done=0, current_rps=0, error_rate=0
            )
        assert hub.stats()["messages_published"] == 0
        hub.broadcast_to_all("ok")
        assert (await recv_json(ws))["type"] == "ok"


async def test_awaited_publish_returns_the_id_and_the_recipients(hub_server: Any) -> None:
    async with (
        hub_server(default_topics=("t",)) as served,
        client(served.url) as (ws, _),
        client(served.url + "?topics=u") as (other, _),
    ):
        hub = served.hub
        to_t = await hub.publish("a", {"n": 1}, "t")
        to_all = await hub.publish("b")
        to_nobody = await hub.publish("c", 3, ["v"])
        assert (to_t.recipients, to_all.recipients, to_nobody.recipients) == (1, 2, 0)
        first, second = await recv_json(ws), await recv_json(ws)
        assert (first["id"], first["data"], second["id"]) == (to_t.id, {"n": 1}, to_all.id)
        assert "data" not in second
        assert (await recv_json(other))["id"] == to_all.id
        with pytest.raises(ValueError, match="reserved"):
            await hub.publish("error", 1)
        with pytest.raises(TypeError):
            await hub.publish("x", object())
    with pytest.raises(RuntimeError, match="not running"):
        await hub.publish("x")


async def test_publish_threadsafe_from_another_thread(hub_server: Any) -> None:
    async with hub_server(default_topics=("t",)) as served, client(served.url) as (ws, _):
        hub = served.hub
        results: list[Any] = []
        thread = threading.Thread(
            target=lambda: results.extend(
                [hub.publish_threadsafe("a", 1, ["t"]), hub.publish_threadsafe("b", 2)]
            )
        )
        thread.start()
        await asyncio.to_thread(thread.join)
        assert [(await recv_json(ws))["type"] for _ in range(2)] == ["a", "b"]
        assert [future.result(timeout=5) for future in results] == [1, 1]


async def test_publish_threadsafe_is_bounded_by_broadcast_buffer_size(hub_server: Any) -> None:
    async with hub_server(broadcast_buffer_size=2) as served, client(served.url) as (ws, _):
        hub = served.hub
        # The loop is busy running this test, so nothing queued here is taken until we await.
        first = hub.publish_threadsafe("a")
        second = hub.publish_threadsafe("b")
        with pytest.raises(wshub.BroadcastBufferFull):
            hub.publish_threadsafe("c")
        assert [(await recv_json(ws))["type"] for _ in range(2)] == ["a", "b"]
        assert first.result(timeout=0) == 1 and second.result(timeout=0) == 1
        assert await asyncio.wrap_future(hub.publish_threadsafe("d")) == 1


async def test_broadcasts_return_zero_before_start_and_after_stop(implementation: str) -> None:
    hub = wshub.Hub(implementation=implementation)  # type: ignore[arg-type]
    assert hub.broadcast_to_all("x", 1) == 0
    assert hub.broadcast_to_subscribers("x", 1, ["t"]) == 0
    assert hub.publish_threadsafe("x", 1).result(timeout=1) == 0
    await hub.stop()  # safe before start
    await hub.stop()
    hub = wshub.Hub(implementation=implementation)  # type: ignore[arg-type]
    async with hub:
        assert hub.running
    assert hub.broadcast_to_all("x", 1) == 0
    assert hub.publish_threadsafe("x", 1).result(timeout=1) == 0
    with pytest.raises(RuntimeError, match="cannot be started again"):
        await hub.start()


async def test_stop_flushes_queued_messages_then_says_goodbye_with_1001(
    hub_server: Any,
) -> None:
    async with hub_server() as served, client(served.url) as (ws, _):
        hub = served.hub
        for index in range(10):
            hub.broadcast_to_all("n", index)
        await hub.stop()  # before the loop had a chance to flush
        assert [(await recv_json(ws))["data"] for _ in range(10)] == list(range(10))
        goodbye = await recv_json(ws)
        assert goodbye["type"] == "disconnection"
        assert goodbye["data"] == {"reason": "server shutdown"}
        with pytest.raises(ConnectionClosedOK) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert hub.client_count == 0
        assert hub.broadcast_to_all("late") == 0


async def test_concurrent_stops_both_wait_for_the_shutdown(hub_server: Any) -> None:
    async with hub_server() as served, client(served.url) as (ws, _):
        hub = served.hub
        await asyncio.gather(hub.stop(), hub.stop())
        assert hub.client_count == 0 and not hub.running
        assert (await recv_json(ws))["type"] == "disconnection"


async def test_stats_and_client_info_count_traffic(hub_server: Any) -> None:
    async with hub_server() as served, client(served.url) as (ws, hello):
        hub = served.hub
        hub.broadcast_to_all("a", 1)
        hub.broadcast_to_subscribers("b", 2, ["x"])
        await send_json(ws, {"type": "bogus"})
        await recv_json(ws), await recv_json(ws), await recv_json(ws)
        stats = hub.stats()
        assert stats["implementation"] == served.hub.implementation
        assert stats["clients"] == 1
        assert stats["messages_published"] == 2
        assert stats["protocol_errors"] == 1
        assert stats["deliveries"] == 4  # greeting, two messages, the error
        assert stats["bytes_sent"] > 0 and stats["drops"] == 0
        assert (stats["publish_failures"], stats["backplane"]) == (0, None)
        assert hub.ready and hub.backplane is None
        [info] = hub.client_info()
        assert info["id"] == hello["client_id"]
        assert info["remote_addr"].startswith("127.0.0.1:")
        assert info["user_agent"].startswith("Python/")
        assert RFC3339_UTC.match(info["connected_at"])
        assert info["messages_sent"] == 4 and info["messages_dropped"] == 0
        assert info["buffered_bytes"] == 0


async def test_start_logs_the_core_at_debug(
    implementation: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="wshub"):
        async with wshub.Hub(implementation=implementation) as hub:  # type: ignore[arg-type]
            assert hub.implementation == implementation
    assert f"hub started with the {implementation} fan-out core" in caplog.text


@pytest.fixture
def faulty_subscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the hub's subscribe handling, to exercise disconnect_on_error."""

    def bug(self: Any, session: Any, topics: tuple[str, ...], since: str | None) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(wshub.clients.Clients, "_subscribe", bug)


@pytest.mark.usefixtures("faulty_subscribe")
async def test_internal_error_closes_the_client_with_1011_by_default(
    hub_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with hub_server() as served, client(served.url) as (ws, _):
        await send_json(ws, {"type": "subscribe", "data": {"topics": ["a"]}})
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "internal error")
    assert "error handling a message" in caplog.text


@pytest.mark.usefixtures("faulty_subscribe")
async def test_internal_error_answers_500_when_disconnect_on_error_is_off(
    hub_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        hub_server(disconnect_on_error=False) as served,
        client(served.url) as (ws, _),
    ):
        await send_json(ws, {"type": "subscribe", "data": {"topics": ["a"]}})
        error = await recv_json(ws)
        assert error["type"] == "error" and error["error"]["code"] == 500
        await send_json(ws, {"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"


def test_runner_records_refuse_unknown_keys_and_wrong_kinds_and_keep_missing_ones_null() -> None:
    with pytest.raises(runner.PayloadError, match="did you mean 'p95_latency_ms'") as unknown:
        runner.new_run_event({"id": "r", "p95_latency_mss": 1.0})
    assert unknown.value.field == "run.p95_latency_mss"
    with pytest.raises(runner.PayloadError, match="must be a finite number or null") as kind:
        runner.regression_event({"id": "g", "percent_change": "18%"}, {"id": "r"})
    assert kind.value.field == "regression.percent_change"
    with pytest.raises(runner.PayloadError, match='needs an "id"'):
        runner.new_run_event({"test_name": "t"})
    data, topics, key = runner.new_run_event({"id": "r", "test_name": "t"})
    assert data["summary"]["p95_latency_ms"] is None and data["git_commit"] is None
    assert topics == ["new_run", "run:r", "test:t"]
    assert key is None, "an event that must not be lost has no key"
    # The dataclasses themselves default to None too.
    assert runner.new_run_event(wshub.HistoricRun("r"))[0]["summary"]["total_requests"] is None


async def test_notify_methods_speak_the_json_bench_format_when_asked(hub_server: Any) -> None:
    async with hub_server(event_format="json-bench") as served, client(served.url) as (ws, _):
        hub = served.hub
        run = wshub.HistoricRun(id="run-7", test_name="eth_call", p95_latency_ms=3.0)
        regression = wshub.Regression(
            id="reg-1",
            baseline_run_id="run-6",
            metric="p95_latency_ms",
            baseline_value=2.5,
            current_value=3.0,
            percent_change=20.0,
            severity="critical",
        )
        assert hub.notify_new_run(run) == 1
        assert hub.notify_regression(regression, run) == 1
        assert hub.notify_baseline_updated("main", "run-7", "eth_call", "created") == 1
        stored = (await recv_json(ws))["data"]
        assert (stored["id"], stored["p95_latency_ms"], stored["total_requests"]) == (
            "run-7",
            3.0,
            None,
        )
        assert (await recv_json(ws))["data"] == {
            "runId": "run-7",
            "baselineId": "run-6",
            "metricName": "p95_latency_ms",
            "baselineValue": 2.5,
            "currentValue": 3.0,
            "percentChange": 20.0,
            "severity": "critical",
        }
        baseline = (await recv_json(ws))["data"]
        assert baseline == {"runId": "run-7", "baselineName": "main", "action": "created"}


async def test_connection_log_lines_read_as_sentences(
    hub_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with hub_server(log_connection_events=True) as served:
        async with client(served.url) as (ws, hello):
            client_id = hello["data"]["client_id"]
            await ws.close(1000)
        await wait_until(lambda: served.hub.client_count == 0)
    text = caplog.text
    assert re.search(rf"client {client_id} connected from \S+ \(1 client\)", text), text
    assert f"client {client_id} disconnected (code 1000; 0 clients)" in text, text
