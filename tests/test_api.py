"""The internal HTTP API over real sockets: publishing, notifications, auth, errors, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import wshub
from wshub.api import (
    HUB_KEY,
    LATENCY_BUCKETS,
    NOTIFY_KINDS,
    REGISTRY_KEY,
    ApiServer,
    create_api_app,
    start_api,
)
from wshub.auth import mint_token
from wshub.bench.redis_server import RedisServer

from .helpers import SECRET, TIMEOUT, HubServer, client, recv_json, send_json, wait_until
from .test_resume import nothing_more, published

TOKEN = "s3cret-token"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@dataclasses.dataclass
class Reply:
    status: int
    headers: Any
    body: Any
    text: str


@dataclasses.dataclass
class Api:
    served: HubServer
    server: ApiServer
    http: aiohttp.ClientSession

    @property
    def hub(self) -> wshub.Hub:
        return self.served.hub

    def ws_url(self, topics: str | None = None) -> str:
        return self.served.url if topics is None else f"{self.served.url}?topics={topics}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        if json is not None:
            data = orjson.dumps(json)
            headers = {"Content-Type": "application/json", **(headers or {})}
        async with self.http.request(
            method, self.server.url + path, data=data, headers=headers
        ) as response:
            text = await response.text()
            body = orjson.loads(text) if response.content_type == "application/json" else None
            return Reply(response.status, response.headers, body, text)

    async def post(self, path: str, body: Any = None, **options: Any) -> Reply:
        return await self.request("POST", path, json=body, **options)

    async def get(self, path: str, **options: Any) -> Reply:
        return await self.request("GET", path, **options)


ApiFactory = Callable[..., contextlib.AbstractAsyncContextManager[Api]]
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
def api(lean_server: Any) -> ApiFactory:
    """Start a hub (both cores) and its API on free ports of 127.0.0.1, with an HTTP client.

    Keyword arguments ``publish_token``, ``max_body_size`` and ``allowed_origins`` go to the
    API, the rest to the hub's config.
    """

    @contextlib.asynccontextmanager
    async def start(**options: Any) -> AsyncIterator[Api]:
        names = ("publish_token", "max_body_size", "allowed_origins")
        api_options = {key: options.pop(key) for key in names if key in options}
        async with lean_server(**options) as served:
            server = await start_api(served.hub, "127.0.0.1", 0, **api_options)
            try:
                timeout = aiohttp.ClientTimeout(total=TIMEOUT)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    yield Api(served, server, http)
            finally:
                await server.close()

    return start


def recipients_of(body: Any) -> Any:
    """The ``recipients`` of a publish answer, after checking that the rest is its id."""
    assert isinstance(body, dict) and set(body) == {"id", "recipients"}, body
    assert re.fullmatch(r"\d+-\d+", body["id"]), body
    return body["recipients"]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# The server and its health


async def test_start_api_binds_loopback_and_reports_the_port(api: ApiFactory) -> None:
    async with api() as running:
        server = running.server
        assert server.host == "127.0.0.1"
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.app[HUB_KEY] is running.hub
        assert isinstance(server.app[REGISTRY_KEY], CollectorRegistry)


async def test_healthz_and_readyz_follow_the_hub(api: ApiFactory) -> None:
    async with api() as running:
        health = await running.get("/healthz")
        assert (health.status, health.body) == (200, {"status": "ok"})
        ready = await running.get("/readyz")
        assert (ready.status, ready.body) == (200, {"status": "ready"})

        await running.hub.stop()

        ready = await running.get("/readyz")
        assert (ready.status, ready.body) == (
            503,
            {"status": "not ready", "reason": "the hub is not running"},
        )
        health = await running.get("/healthz")
        assert (health.status, health.body) == (200, {"status": "ok"})


async def test_publish_to_a_stopped_hub_is_answered_503(api: ApiFactory) -> None:
    async with api() as running:
        await running.hub.stop()
        reply = await running.post("/api/publish", {"type": "note", "data": 1})
        assert reply.status == 503
        assert reply.body == {
            "error": {"code": 503, "message": "the hub is not running"},
            "outcome": "not_published",
        }


# Publishing


async def test_publish_without_topics_reaches_every_client(api: ApiFactory) -> None:
    async with (
        api() as running,
        client(running.ws_url(topics="")) as (ws, _),  # subscribed to nothing
    ):
        reply = await running.post("/api/publish", {"type": "note", "data": {"n": [1, "two"]}})
        assert (reply.status, recipients_of(reply.body)) == (200, 1)
        assert reply.headers["Content-Type"] == "application/json"
        message = await recv_json(ws)
        assert (message["type"], message["data"]) == ("note", {"n": [1, "two"]})
        assert RFC3339.match(message["timestamp"])
        assert "id" in message

        # No data, and topics null: a broadcast without a "data" key.
        reply = await running.post("/api/publish", {"type": "bare", "topics": None})
        assert (reply.status, recipients_of(reply.body)) == (200, 1)
        message = await recv_json(ws)
        assert message["type"] == "bare"
        assert "data" not in message
        assert running.hub.stats()["messages_published"] == 2


async def test_publish_with_topics_reaches_only_their_subscribers(api: ApiFactory) -> None:
    async with (
        api() as running,
        client(running.ws_url(topics="alpha")) as (alpha, _),
        client(running.ws_url(topics="beta")) as (beta, _),
        client(running.ws_url(topics="alpha,gamma")) as (both, _),
    ):
        reply = await running.post(
            "/api/publish", {"type": "note", "data": "to alpha", "topics": ["alpha", "gamma"]}
        )
        assert (reply.status, recipients_of(reply.body)) == (200, 2)
        reply = await running.post(
            "/api/publish", {"type": "note", "data": "to beta", "topics": ["beta"]}
        )
        assert (reply.status, recipients_of(reply.body)) == (200, 1)

        assert (await recv_json(alpha))["data"] == "to alpha"
        assert (await recv_json(both))["data"] == "to alpha"  # once, though two topics match
        # beta's first message is the second publish: the first one never reached it.
        assert (await recv_json(beta))["data"] == "to beta"

        reply = await running.post("/api/publish", {"type": "end", "topics": []})
        assert recipients_of(reply.body) == 0  # only "*" subscribers match no topic at all


async def test_a_publish_retried_with_its_idempotency_key_is_delivered_once(
    api: ApiFactory,
) -> None:
    async with api() as running, client(running.ws_url()) as (ws, _):
        body = {"type": "note", "data": 1, "idempotency_key": "k-body"}
        first = await running.post("/api/publish", body)
        again = await running.post("/api/publish", body)
        assert first.status == again.status == 200
        assert again.body == {"id": first.body["id"], "recipients": 0, "duplicate": True}
        # The header does the same, for publish and for every notify kind.
        headers = {"Idempotency-Key": "k-header"}
        run = {"run_id": "r", "test_name": "t", "error": "x"}
        failed = await running.post("/api/notify/run_failed", run, headers=headers)
        failed_again = await running.post("/api/notify/run_failed", run, headers=headers)
        assert failed_again.body == {"id": failed.body["id"], "recipients": 0, "duplicate": True}
        header_only = {"type": "note", "data": 2}
        noted = await running.post("/api/publish", header_only, headers=headers)
        assert noted.body["duplicate"] is True  # one key, one message, whichever the endpoint
        messages = await published(ws, 2)
        assert [m["id"] for m in messages] == [first.body["id"], failed.body["id"]]
        await nothing_more(ws)


async def test_a_publish_may_carry_a_conflation_key(api: ApiFactory) -> None:
    async with api() as running, client(running.ws_url()) as (ws, _):
        reply = await running.post("/api/publish", {"type": "state", "data": 1, "key": "run:7"})
        assert reply.status == 200, reply.body
        progress = {
            "run_id": "r7",
            "test_name": "t",
            "progress": 0.5,
            "elapsed_s": 1.0,
            "requests_done": 1,
            "current_rps": 1.0,
            "error_rate": 0.0,
        }
        reply = await running.post("/api/notify/run_progress", progress)
        assert reply.status == 200, reply.body
        messages = await published(ws, 2)
        assert [m.get("key") for m in messages] == ["run:7", "run:r7"]
        for bad in ("", "k" * 257, 5, ["run:7"]):
            reply = await running.post("/api/publish", {"type": "state", "key": bad})
            assert reply.status == 400, (bad, reply.body)
            assert reply.body["error"]["field"] == "key"
        assert running.hub.stats()["messages_published"] == 2


async def test_topics_show_subscribers_and_watchers(api: ApiFactory) -> None:
    async with (
        api() as running,
        client(running.ws_url(topics="run:1,test:a")) as _,
        client(running.ws_url(topics="run:1")) as _,
        client(running.ws_url(topics="*,run:1")) as _,
    ):
        reply = await running.get("/api/topics")
        assert reply.status == 200
        assert reply.body == {
            "topics": {
                "*": {"subscribers": 1, "watchers": 1},
                "run:1": {"subscribers": 3, "watchers": 3},  # the "*" client counted once
                "test:a": {"subscribers": 1, "watchers": 2},
            },
            "hubs": 1,
        }
        reply = await running.get("/api/topics?topic=run:2")
        assert reply.body == {"topic": "run:2", "subscribers": 0, "watchers": 1, "hubs": 1}
        reply = await running.get("/api/topics?topic=" + "x" * 257)
        assert (reply.status, reply.body["error"]["field"]) == (400, "topic")
        running.hub.broadcast_to_all("state", 1, key="run:1")
        running.hub.broadcast_to_all("state", 2, key="run:1")
        running.hub.broadcast_to_all("event", 3)
        samples = metric_samples((await running.get("/metrics")).text)
        assert samples[("wshub_retained_keys", ())] == 1
        assert samples[("wshub_retained_events", ())] == 1
        assert samples[("wshub_topics", ())] == 3
        assert samples[("wshub_topic_subscribers", (("topic", "run:1"),))] == 3
        assert samples[("wshub_topic_subscribers", (("topic", "test:a"),))] == 1


async def test_bad_idempotency_keys_are_400_naming_the_field(api: ApiFactory) -> None:
    async with api() as running:
        for body, headers in (
            ({"type": "n", "idempotency_key": ""}, None),
            ({"type": "n", "idempotency_key": 5}, None),
            ({"type": "n"}, {"Idempotency-Key": "x" * 129}),
            ({"type": "n", "idempotency_key": "a"}, {"Idempotency-Key": "b"}),
        ):
            reply = await running.post("/api/publish", body, headers=headers)
            assert reply.status == 400, (body, reply.body)
            assert reply.body["error"]["field"] == "idempotency_key"
        assert running.hub.stats()["messages_published"] == 0


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"]
)
async def test_a_body_a_web_page_could_post_without_preflight_is_refused(
    api: ApiFactory, content_type: str
) -> None:
    """A browser on the hub's host sends these cross-site without asking first (no CORS
    preflight), so any web page could publish to every dashboard: 415, nothing published."""
    async with api() as running, client(running.ws_url()) as (ws, _):
        reply = await running.request(
            "POST",
            "/api/publish",
            data=b'{"type": "plain"}',
            headers={"Content-Type": content_type},
        )
        assert reply.status == 415
        assert reply.body == {
            "error": {"code": 415, "message": "Content-Type must be application/json"}
        }
        await assert_nothing_published(running, ws)


async def test_a_post_from_another_origin_is_refused(api: ApiFactory) -> None:
    async with (
        api(allowed_origins=["https://runner.example"]) as running,
        client(running.ws_url()) as (ws, _),
    ):
        reply = await running.post(
            "/api/publish", {"type": "x"}, headers={"Origin": "https://evil.example"}
        )
        assert reply.status == 403
        assert "https://evil.example" in reply.body["error"]["message"]
        await assert_nothing_published(running, ws)
        allowed = await running.post(
            "/api/publish", {"type": "x"}, headers={"Origin": "https://runner.example"}
        )
        assert (allowed.status, recipients_of(allowed.body)) == (200, 1)
        assert (await recv_json(ws))["type"] == "x"


async def test_a_publish_larger_than_max_publish_size_is_413(api: ApiFactory) -> None:
    async with api(max_publish_size=1000) as running, client(running.ws_url()) as (ws, _):
        reply = await running.post("/api/publish", {"type": "big", "data": "x" * 1000})
        assert reply.status == 413
        assert "max_publish_size (1000 bytes)" in reply.body["error"]["message"]
        await assert_nothing_published(running, ws)
        fits = await running.post("/api/publish", {"type": "small", "data": "x" * 800})
        assert (fits.status, recipients_of(fits.body)) == (200, 1)
        assert (await recv_json(ws))["type"] == "small"


async def assert_nothing_published(running: Api, ws: Any) -> None:
    """Nothing reached ``ws``: the next thing it gets is the pong to its ping."""
    assert running.served.hub.stats()["messages_published"] == 0
    await send_json(ws, {"type": "ping"})
    assert (await recv_json(ws))["type"] == "pong"


# The runner's notifications

NOTIFICATIONS: list[tuple[str, dict[str, Any], dict[str, Any], str | None]] = [
    (
        "new_run",
        {
            "run": {
                "id": "r-1",
                "test_name": "t-1",
                "timestamp": "2026-11-25T18:00:00Z",
                "git_commit": "abc123",
                "total_requests": 1000,
                "total_errors": 3,
                "overall_error_rate": 0.003,
                "avg_latency_ms": 1.5,
                "p95_latency_ms": 4.0,
                "best_client": "geth",
                "performance_scores": {"geth": 0.9},
            }
        },
        {
            "run_id": "r-1",
            "test_name": "t-1",
            "timestamp": "2026-11-25T18:00:00Z",
            "git_commit": "abc123",
            "status": "completed",
            "summary": {
                "total_requests": 1000,
                "total_errors": 3,
                "overall_error_rate": 0.003,
                "avg_latency_ms": 1.5,
                "p95_latency_ms": 4.0,
                "best_client": "geth",
                "performance_scores": {"geth": 0.9},
            },
        },
        None,
    ),
    (
        "regression_detected",
        {
            "regression": {
                "id": "g-1",
                "run_id": "r-1",
                "baseline_run_id": "r-0",
                "client": "geth",
                "metric": "p95_latency_ms",
                "method": "eth_call",
                "severity": "major",
                "percent_change": 25.0,
                "absolute_change": 1.0,
                "baseline_value": 4.0,
                "current_value": 5.0,
                "is_significant": True,
                "p_value": 0.01,
                "detected_at": "2026-11-25T18:01:00Z",
            },
            "run": {"id": "r-1", "test_name": "t-1", "git_commit": "abc123"},
        },
        {
            "regression_id": "g-1",
            "run_id": "r-1",
            "baseline_run_id": "r-0",
            "client": "geth",
            "metric": "p95_latency_ms",
            "method": "eth_call",
            "severity": "major",
            "percent_change": 25.0,
            "absolute_change": 1.0,
            "baseline_value": 4.0,
            "current_value": 5.0,
            "is_significant": True,
            "p_value": 0.01,
            "detected_at": "2026-11-25T18:01:00Z",
            "test_name": "t-1",
            "run_info": {"test_name": "t-1", "git_commit": "abc123", "timestamp": None},
        },
        None,
    ),
    (
        "baseline_updated",
        {"baseline_name": "main", "run_id": "r-1", "test_name": "t-1"},
        {"baseline_name": "main", "run_id": "r-1", "test_name": "t-1", "action": "updated"},
        "updated_at",
    ),
    (
        "analysis_complete",
        {"run_id": "r-1", "test_name": "t-1", "analysis_results": {"verdict": "ok", "n": [1]}},
        {"run_id": "r-1", "test_name": "t-1", "analysis_results": {"verdict": "ok", "n": [1]}},
        "completed_at",
    ),
    (
        "run_started",
        {
            "run_id": "r-1",
            "test_name": "t-1",
            "git_commit": "abc123",
            "clients": ["geth", "reth"],
            "planned_requests": 5000,
        },
        {
            "run_id": "r-1",
            "test_name": "t-1",
            "git_commit": "abc123",
            "git_branch": None,
            "clients": ["geth", "reth"],
            "methods": [],
            "planned_requests": 5000,
        },
        "started_at",
    ),
    (
        "run_progress",
        {
            "run_id": "r-1",
            "test_name": "t-1",
            "progress": 0.5,
            "elapsed_s": 30.0,
            "requests_done": 15000,
            "current_rps": 500.0,
            "error_rate": 0.0,
        },
        {
            "run_id": "r-1",
            "test_name": "t-1",
            "progress": 0.5,
            "elapsed_s": 30.0,
            "requests_done": 15000,
            "current_rps": 500.0,
            "error_rate": 0.0,
        },
        None,
    ),
    (
        "run_complete",
        {"run_id": "r-1", "test_name": "t-1", "duration_s": 60.5, "total_requests": 30000},
        {
            "run_id": "r-1",
            "test_name": "t-1",
            "duration_s": 60.5,
            "total_requests": 30000,
            "total_errors": None,
            "error_rate": None,
        },
        "completed_at",
    ),
    (
        "run_failed",
        {"run_id": "r-1", "test_name": "t-1", "error": "node crashed", "elapsed_s": 12},
        {"run_id": "r-1", "test_name": "t-1", "error": "node crashed", "elapsed_s": 12},
        "failed_at",
    ),
]


def test_every_notify_kind_is_tested() -> None:
    assert sorted(kind for kind, *_ in NOTIFICATIONS) == sorted(NOTIFY_KINDS)
    assert len(NOTIFY_KINDS) == 8


@pytest.mark.parametrize(
    ("kind", "body", "expected", "time_key"),
    NOTIFICATIONS,
    ids=[kind for kind, *_ in NOTIFICATIONS],
)
async def test_notify_reaches_subscribers_of_its_type_run_and_test(
    api: ApiFactory,
    kind: str,
    body: dict[str, Any],
    expected: dict[str, Any],
    time_key: str | None,
) -> None:
    async with (
        api(publish_token=TOKEN) as running,
        client(running.ws_url(topics=kind)) as (by_type, _),
        client(running.ws_url(topics="run:r-1")) as (by_run, _),
        client(running.ws_url(topics="test:t-1")) as (by_test, _),
        client(running.ws_url(topics="run:other")) as (other, _),
    ):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        reply = await running.post(f"/api/notify/{kind}", body, headers=auth)
        assert (reply.status, recipients_of(reply.body)) == (200, 3)
        for ws in (by_type, by_run, by_test):
            message = await recv_json(ws)
            assert message["type"] == kind
            data = dict(message["data"])
            if time_key is not None:
                assert RFC3339.match(data.pop(time_key))
            assert data == expected

        # The unrelated subscriber's first message is this one, not the notification.
        reply = await running.post(
            "/api/publish", {"type": "marker", "topics": ["run:other"]}, headers=auth
        )
        assert recipients_of(reply.body) == 1
        assert (await recv_json(other))["type"] == "marker"


async def test_a_run_announced_late_keeps_its_own_start_time(api: ApiFactory) -> None:
    async with api() as running, client(running.ws_url()) as (ws, _):
        body = {"run_id": "r-1", "test_name": "t-1", "started_at": "2026-12-01T10:00:00Z"}
        reply = await running.post("/api/notify/run_started", body)
        assert recipients_of(reply.body) == 1
        assert (await recv_json(ws))["data"]["started_at"] == "2026-12-01T10:00:00Z"


async def test_unknown_notify_kind_is_404(api: ApiFactory) -> None:
    async with api() as running:
        reply = await running.post("/api/notify/run_paused", {"run_id": "r", "test_name": "t"})
        assert reply.status == 404
        error = reply.body["error"]
        assert error["code"] == 404
        assert "run_paused" in error["message"]
        assert running.hub.stats()["messages_published"] == 0


# Introspection


async def test_clients_and_stats(api: ApiFactory) -> None:
    async with (
        api() as running,
        client(running.ws_url(topics="a,b"), user_agent_header="dashboard/1") as (_, hello),
    ):
        reply = await running.get("/api/clients")
        assert reply.status == 200
        [info] = reply.body
        assert info["id"] == hello["client_id"]
        assert info["subscriptions"] == ["a", "b"]
        assert info["user_agent"] == "dashboard/1"
        assert info["remote_addr"].startswith("127.0.0.1:")

        await running.post("/api/publish", {"type": "note"})
        reply = await running.get("/api/stats")
        assert reply.status == 200
        assert reply.body == running.hub.stats()
        assert reply.body["clients"] == 1
        assert reply.body["messages_published"] == 1


async def test_clients_show_who_each_client_is_and_metrics_count_refusals_by_reason(
    api: ApiFactory,
) -> None:
    alice = mint_token(SECRET, sub="alice", topics=["test:team-a-*"], ttl=600)
    expired = jwt.encode({"exp": 1, "sub": "bob"}, SECRET, algorithm="HS256")
    async with api(auth_required=True, auth_secret=SECRET) as running:
        for query in ("", f"&token={expired}", f"&token={expired}", "&token=x.y.z"):
            with pytest.raises(InvalidStatus):
                async with connect(running.ws_url(topics="test:team-a-eth") + query):
                    pass
        url = running.ws_url(topics="test:team-a-eth") + f"&token={alice}"
        async with client(url):
            [info] = (await running.get("/api/clients")).body
            assert info["identity"] == "alice"
            assert info["token_expires_at"].endswith("Z")
            assert alice not in json.dumps(info)
            samples = metric_samples((await running.get("/metrics")).text)
        refused = {
            dict(labels)["reason"]: value
            for (name, labels), value in samples.items()
            if name == "wshub_refused_handshakes_total"
        }
        assert refused == {"missing": 1, "expired": 2, "malformed": 1}
        assert running.hub.stats()["refused_handshakes"] == refused


# Authentication


async def test_api_routes_need_the_bearer_token(api: ApiFactory) -> None:
    async with api(publish_token=TOKEN) as running, client(running.ws_url()) as (ws, _):
        requests: list[tuple[str, str, Any]] = [
            ("POST", "/api/publish", {"type": "note"}),
            ("POST", "/api/notify/run_failed", {"run_id": "r", "test_name": "t", "error": "x"}),
            ("POST", "/api/notify/no_such_kind", {}),
            ("GET", "/api/clients", None),
            ("GET", "/api/stats", None),
            ("GET", "/api/nowhere", None),
        ]
        for method, path, body in requests:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": "Bearer"},
            ):
                reply = await running.request(method, path, json=body, headers=headers)
                assert reply.status == 401, (method, path, headers)
                assert reply.headers["WWW-Authenticate"].startswith("Bearer")
                assert reply.body["error"]["code"] == 401
        assert running.hub.stats()["messages_published"] == 0

        auth = {"Authorization": f"Bearer {TOKEN}"}
        reply = await running.post("/api/publish", {"type": "note"}, headers=auth)
        assert (reply.status, recipients_of(reply.body)) == (200, 1)
        assert (await recv_json(ws))["type"] == "note"
        lower_scheme = {"Authorization": f"bearer {TOKEN}"}
        assert (await running.get("/api/stats", headers=lower_scheme)).status == 200
        assert (await running.get("/api/clients", headers=auth)).status == 200

        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await running.get(path)).status == 200, path


def test_an_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="publish_token"):
        create_api_app(wshub.Hub(), publish_token="")


# Bad requests

# Parses (orjson reads 1024 levels) but cannot be serialized (orjson writes 254).
DEEP = "[" * 300 + "]" * 300


def deep(template: str) -> bytes:
    return template.replace("DEEP", DEEP).encode()


PROGRESS = {
    "run_id": "r",
    "test_name": "t",
    "progress": 0.5,
    "elapsed_s": 1.0,
    "requests_done": 10,
    "current_rps": 10.0,
    "error_rate": 0.0,
}

BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("/api/publish", b"{not json", "body"),
    ("/api/publish", b"", "body"),
    ("/api/publish", b"\xff\xfe", "body"),
    ("/api/publish", b'["type", "note"]', "body"),
    ("/api/publish", b'"note"', "body"),
    ("/api/publish", b'{"data": 1}', "type"),
    ("/api/publish", b'{"type": ""}', "type"),
    ("/api/publish", b'{"type": 5}', "type"),
    ("/api/publish", b'{"type": "connection", "data": {}}', "type"),
    ("/api/publish", b'{"type": "error"}', "type"),
    ("/api/publish", b'{"type": "note", "topics": "alpha"}', "topics"),
    ("/api/publish", b'{"type": "note", "topics": ["alpha", 1]}', "topics"),
    ("/api/publish", b'{"type": "note", "topics": [""]}', "topics"),
    ("/api/publish", orjson.dumps({"type": "note", "topics": ["x" * 257]}), "topics"),
    ("/api/publish", deep('{"type": "note", "data": DEEP}'), "data"),
    ("/api/notify/run_progress", orjson.dumps({**PROGRESS, "progress": 1.5}), "progress"),
    ("/api/notify/run_progress", orjson.dumps({**PROGRESS, "progress": -0.1}), "progress"),
    ("/api/notify/run_progress", orjson.dumps({**PROGRESS, "progress": "half"}), "progress"),
    ("/api/notify/run_progress", orjson.dumps({**PROGRESS, "progress": True}), "progress"),
    (
        "/api/notify/run_progress",
        orjson.dumps({**PROGRESS, "requests_done": 1.5}),
        "requests_done",
    ),
    ("/api/notify/run_progress", orjson.dumps({**PROGRESS, "elapsed_s": None}), "elapsed_s"),
    ("/api/notify/run_progress", orjson.dumps({**PROGRESS, "run_id": 7}), "run_id"),
    ("/api/notify/run_progress", b'{"test_name": "t"}', "run_id"),
    ("/api/notify/run_started", b'{"run_id": "r", "test_name": "t", "clients": [1]}', "clients"),
    (
        "/api/notify/run_started",
        b'{"run_id": "r", "test_name": "t", "started_at": 5}',
        "started_at",
    ),
    (
        "/api/notify/run_started",
        b'{"run_id": "r", "test_name": "t", "planned_requests": -1}',
        "planned_requests",
    ),
    (
        "/api/notify/run_started",
        b'{"run_id": "r", "test_name": "t", "git_commit": 1}',
        "git_commit",
    ),
    (
        "/api/notify/run_complete",
        b'{"run_id": "r", "test_name": "t", "error_rate": "0"}',
        "error_rate",
    ),
    ("/api/notify/run_failed", b'{"run_id": "r", "test_name": "t"}', "error"),
    ("/api/notify/new_run", b"{}", "run"),
    ("/api/notify/new_run", b'{"run": []}', "run"),
    ("/api/notify/new_run", b'{"run": {"test_name": "t"}}', "run.id"),
    ("/api/notify/new_run", b'{"run": {"id": "r", "test_name": 5}}', "run.test_name"),
    (
        "/api/notify/new_run",
        deep('{"run": {"id": "r", "performance_scores": DEEP}}'),
        "run.performance_scores",
    ),
    # Keys that are not the endpoint's or the record's, and values of the wrong kind.
    ("/api/publish", b'{"type": "note", "topic": ["a"]}', "topic"),
    ("/api/notify/run_progress", orjson.dumps({**PROGRESS, "progres": 0.5}), "progres"),
    ("/api/notify/new_run", b'{"run": {"id": "r", "p95_latncy_ms": 3}}', "run.p95_latncy_ms"),
    ("/api/notify/new_run", b'{"run": {"id": "r", "total_requests": "9"}}', "run.total_requests"),
    ("/api/notify/new_run", b'{"run": {"id": "r", "is_baseline": 1}}', "run.is_baseline"),
    ("/api/notify/new_run", b'{"run": {"id": "r", "tags": [1]}}', "run.tags"),
    ("/api/notify/new_run", b'{"run": {"id": "r"}, "regression": {}}', "regression"),
    (
        "/api/notify/regression_detected",
        b'{"regression": {"id": "g", "percent_chnage": 3}, "run": {"id": "r"}}',
        "regression.percent_chnage",
    ),
    (
        "/api/notify/regression_detected",
        b'{"regression": {"id": "g", "percent_change": "18%"}, "run": {"id": "r"}}',
        "regression.percent_change",
    ),
    ("/api/notify/regression_detected", b'{"run": {"id": "r"}}', "regression"),
    ("/api/notify/regression_detected", b'{"regression": {"id": "g"}}', "run"),
    ("/api/notify/baseline_updated", b'{"run_id": "r", "test_name": "t"}', "baseline_name"),
    ("/api/notify/analysis_complete", b'{"run_id": "r", "test_name": "t"}', "analysis_results"),
    (
        "/api/notify/analysis_complete",
        deep('{"run_id": "r", "test_name": "t", "analysis_results": DEEP}'),
        "analysis_results",
    ),
]


async def test_bad_bodies_are_400_naming_the_field(api: ApiFactory) -> None:
    async with api() as running, client(running.ws_url()) as (ws, _):
        for path, raw, field in BAD_BODIES:
            reply = await running.request("POST", path, data=raw, headers=JSON_HEADERS)
            assert reply.status == 400, (path, raw[:80], reply.text)
            error = reply.body["error"]
            assert (error["code"], error["field"]) == (400, field), (path, raw[:80], error)
            assert error["message"]
        # Nothing reached the hub: its counters and the client's queue are untouched.
        assert running.hub.stats()["messages_published"] == 0
        reply = await running.post("/api/publish", {"type": "after"})
        assert recipients_of(reply.body) == 1
        assert (await recv_json(ws))["type"] == "after"


def documented_bodies() -> list[tuple[str, Any]]:
    """The notify bodies docs/api.md shows under "A body of every kind", with their kinds."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    section = text.split("### A body of every kind", 1)[1].split("\n## ", 1)[0]
    bodies = [
        (kind, orjson.loads(body))
        for body, kind in re.findall(r"```json\n(.*?)```\n\(`(\w+)`\)", section, re.S)
    ]
    for kind, body in re.findall(r"api/notify/(\w+) .*?-d '(.*?)'", section, re.S):
        bodies.append((kind, orjson.loads(body)))
    return bodies


async def test_the_documented_body_of_every_notify_kind_is_accepted(api: ApiFactory) -> None:
    bodies = documented_bodies()
    assert sorted(kind for kind, _ in bodies) == sorted(NOTIFY_KINDS)
    async with api() as running:
        for kind, body in bodies:
            reply = await running.post(f"/api/notify/{kind}", body)
            assert reply.status == 200, (kind, reply.body)


async def test_a_misspelt_key_is_named_with_the_key_it_was_meant_to_be(api: ApiFactory) -> None:
    async with api() as running:
        body = {"regression": {"id": "g", "percent_chnage": 3.0}, "run": {"id": "r"}}
        reply = await running.post("/api/notify/regression_detected", body)
        assert reply.body["error"]["message"] == (
            "regression.percent_chnage is not a field of the runner's Regression; "
            "did you mean 'percent_change'?"
        )
        reply = await running.post("/api/notify/run_failed", {"run_id": "r", "eror": "x"})
        assert reply.body["error"]["message"] == (
            "eror is not a key of this body; did you mean 'error'?"
        )


async def test_metrics_the_runner_did_not_give_are_null_never_zero(api: ApiFactory) -> None:
    async with api() as running, client(running.ws_url()) as (ws, _):
        await running.post("/api/notify/new_run", {"run": {"id": "r", "test_name": "t"}})
        stored = (await recv_json(ws))["data"]
        assert set(stored["summary"].values()) == {None}
        assert (stored["git_commit"], stored["timestamp"]) == (None, None)
        body = {"regression": {"id": "g", "severity": "high"}, "run": {"id": "r"}}
        await running.post("/api/notify/regression_detected", body)
        found = (await recv_json(ws))["data"]
        for key in ("percent_change", "baseline_value", "current_value", "p_value", "metric"):
            assert found[key] is None, key
        assert found["severity"] == "high"


async def test_bodies_over_max_body_size_are_413(api: ApiFactory) -> None:
    limit = 1024
    async with api(max_body_size=limit) as running, client(running.ws_url()) as (ws, _):
        # A body of exactly the limit passes.
        padding = limit - len(orjson.dumps({"type": "fits", "data": ""}))
        exact = orjson.dumps({"type": "fits", "data": "x" * padding})
        assert len(exact) == limit
        reply = await running.request("POST", "/api/publish", data=exact, headers=JSON_HEADERS)
        assert (reply.status, recipients_of(reply.body)) == (200, 1)
        assert (await recv_json(ws))["type"] == "fits"

        too_big = orjson.dumps({"type": "fits", "data": "x" * (padding + 1)})
        assert len(too_big) == limit + 1
        reply = await running.request("POST", "/api/publish", data=too_big, headers=JSON_HEADERS)
        assert reply.status == 413
        assert reply.body["error"]["code"] == 413

        # Without a Content-Length (chunked), the limit holds while reading.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b" " * 512
            yield b'{"type": "big"}'

        reply = await running.request(
            "POST", "/api/notify/run_failed", data=chunks(), headers=JSON_HEADERS
        )
        assert reply.status == 413
        assert reply.body["error"]["code"] == 413

        # A much larger body is refused from its Content-Length, and the server goes on.
        huge = io.BytesIO(b"x" * (2 * 1024 * 1024))
        reply = await running.request("POST", "/api/publish", data=huge, headers=JSON_HEADERS)
        assert reply.status == 413
        assert running.hub.stats()["messages_published"] == 1
        assert (await running.get("/healthz")).status == 200


async def test_unknown_routes_and_methods_are_json_errors(api: ApiFactory) -> None:
    async with api() as running:
        reply = await running.get("/nowhere")
        assert reply.status == 404
        assert reply.body["error"]["code"] == 404
        reply = await running.get("/api/publish")
        assert reply.status == 405
        assert reply.body["error"]["code"] == 405
        assert reply.headers["Allow"] == "POST"


async def test_a_client_leaving_mid_body_is_no_server_error(
    api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with api() as running:
        _, writer = await asyncio.open_connection("127.0.0.1", running.server.port)
        writer.write(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        # The access log line is written once the handler has given up on the body.
        await wait_until(lambda: '"POST /api/publish HTTP/1.1" 400' in caplog.text)
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
        assert running.hub.stats()["messages_published"] == 0
        assert (await running.get("/healthz")).status == 200


class ExplodingHub(wshub.Hub):
    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")


async def test_an_error_inside_the_hub_is_a_500_and_the_server_goes_on(
    api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with api(hub_class=ExplodingHub) as running:
        body = {"run_id": "r", "test_name": "t", "error": "x"}
        reply = await running.post("/api/notify/run_failed", body)
        assert reply.status == 500
        assert reply.body == {"error": {"code": 500, "message": "internal error"}}
        assert "boom" in caplog.text
        assert (await running.get("/healthz")).status == 200


# Metrics


async def test_metrics_report_the_hub_counters_and_the_latency_histogram(
    api: ApiFactory,
) -> None:
    async with api() as running, client(running.ws_url(topics="alpha")) as (ws, _):
        for n in range(3):
            reply = await running.post("/api/publish", {"type": "note", "data": n})
            assert recipients_of(reply.body) == 1
        reply = await running.post("/api/publish", {"type": "nobody", "topics": ["beta"]})
        assert recipients_of(reply.body) == 0  # published, but nothing to flush: not timed
        for n in range(3):
            assert (await recv_json(ws))["data"] == n

        reply = await running.get("/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        samples = metric_samples(reply.text)
        stats = running.hub.stats()

        assert samples[("wshub_clients_connected", ())] == 1
        assert samples[("wshub_hub_running", ())] == 1
        assert samples[("wshub_messages_published_total", ())] == 4
        assert stats["deliveries"] == 4  # the greeting and three publishes
        expected_counters = {
            "wshub_deliveries_total": stats["deliveries"],
            "wshub_drops_total": 0,
            "wshub_conflated_total": 0,
            "wshub_bytes_sent_total": stats["bytes_sent"],
            "wshub_writes_total": stats["writes"],
            "wshub_slow_consumer_disconnects_total": 0,
            "wshub_protocol_errors_total": 0,
            "wshub_rejected_connections_total": 0,
        }
        for name, value in expected_counters.items():
            assert samples[(name, ())] == value, name
        assert stats["bytes_sent"] > 0
        info = {labels: value for (name, labels), value in samples.items() if name == "wshub_info"}
        assert info == {
            (
                ("implementation", running.hub.implementation),
                ("version", wshub.__version__),
            ): 1.0
        }

        histogram = "wshub_api_publish_to_flush_seconds"
        assert samples[(f"{histogram}_count", ())] == 3
        assert samples[(f"{histogram}_sum", ())] > 0
        buckets = {
            dict(labels)["le"]: value
            for (name, labels), value in samples.items()
            if name == f"{histogram}_bucket"
        }
        assert set(buckets) == {str(float(bound)) for bound in LATENCY_BUCKETS} | {"+Inf"}
        assert buckets["+Inf"] == 3
        counts = [buckets[str(float(bound))] for bound in LATENCY_BUCKETS]
        assert counts == sorted(counts)  # cumulative
        for line in (
            "# HELP wshub_messages_published_total",
            "# TYPE wshub_messages_published_total counter",
            "# TYPE wshub_clients_connected gauge",
            f"# TYPE {histogram} histogram",
        ):
            assert line in reply.text

        await running.hub.stop()
        samples = metric_samples((await running.get("/metrics")).text)
        assert samples[("wshub_hub_running", ())] == 0
        assert samples[("wshub_clients_connected", ())] == 0


async def test_compression_shows_in_clients_stats_and_metrics(api: ApiFactory) -> None:
    async with api(compression="deflate") as running, client(running.ws_url()) as (ws, _):
        running.hub.broadcast_to_all("run_progress", {"note": "compressible " * 40})
        assert (await recv_json(ws))["type"] == "run_progress"
        stats = (await running.get("/api/stats")).body
        assert stats["compressed_clients"] == 1
        assert stats["messages_compressed"] >= 1
        (info,) = (await running.get("/api/clients")).body
        assert info["compression"] == "deflate"
        samples = metric_samples((await running.get("/metrics")).text)
        assert samples[("wshub_compressed_clients", ())] == 1
        compressed = samples[("wshub_messages_compressed_total", ())]
        assert compressed == stats["messages_compressed"]


async def test_notifications_are_timed_too_and_flush_interval_delays_the_observation(
    api: ApiFactory,
) -> None:
    async with api(flush_interval=0.02) as running, client(running.ws_url()) as (ws, _):
        registry = running.server.app[REGISTRY_KEY]
        count = "wshub_api_publish_to_flush_seconds_count"
        body = {"run_id": "r", "test_name": "t", "error": "x"}
        reply = await running.post("/api/notify/run_failed", body)
        assert recipients_of(reply.body) == 1
        assert (await recv_json(ws))["type"] == "run_failed"
        await wait_until(lambda: registry.get_sample_value(count) == 1)
        # Observed from a timer due flush_interval after the publish; the bound is half the
        # interval because libuv times from the start of the loop iteration, in milliseconds.
        total = registry.get_sample_value("wshub_api_publish_to_flush_seconds_sum")
        assert total is not None and total >= 0.01


async def test_apps_have_registries_of_their_own(api: ApiFactory) -> None:
    async with api() as first:
        second = await start_api(first.hub, "127.0.0.1", 0)
        try:
            assert second.port != first.server.port
            assert second.app[REGISTRY_KEY] is not first.server.app[REGISTRY_KEY]
            async with first.http.get(f"{second.url}/metrics") as response:
                assert response.status == 200
        finally:
            await second.close()
        with pytest.raises(ValueError):
            create_api_app(first.hub, registry=first.server.app[REGISTRY_KEY])


# Joined through Redis


async def test_a_publish_to_a_frozen_redis_is_503_outcome_unknown_and_its_retry_is_a_duplicate(
    api: ApiFactory, redis_server: RedisServer
) -> None:
    async with (
        api(redis_url=redis_server.url) as running,
        client(running.ws_url()) as (ws, _),
    ):
        body = {"type": "note", "data": "once", "idempotency_key": "deploy-7"}
        redis_server.freeze()
        reply = await running.post("/api/publish", body)
        assert reply.status == 503
        assert reply.body["outcome"] == "unknown", reply.body
        assert reply.body["error"]["message"].startswith("outcome unknown")
        redis_server.thaw()
        await wait_until(lambda: running.hub.ready, timeout=15)
        again = await running.post("/api/publish", body)
        assert again.status == 200 and again.body["duplicate"] is True
        [message] = await published(ws, 1)
        assert (message["data"], message["id"]) == ("once", again.body["id"])
        await nothing_more(ws)


async def test_api_with_redis_publishes_through_it_and_answers_503_while_it_is_down(
    api: ApiFactory, redis_server: RedisServer
) -> None:
    async with (
        api(redis_url=redis_server.url) as running,
        client(running.ws_url()) as (ws, _),
    ):
        reply = await running.post(
            "/api/notify/run_failed", {"run_id": "r", "test_name": "t", "error": "x"}
        )
        assert (reply.status, recipients_of(reply.body)) == (200, 1)
        message = await recv_json(ws)
        assert (message["type"], message["id"]) == ("run_failed", reply.body["id"])
        assert (await running.get("/readyz")).status == 200

        redis_server.kill()
        await wait_until(lambda: not running.hub.ready)
        ready = await running.get("/readyz")
        assert ready.status == 503
        assert ready.body["status"] == "not ready"
        assert ready.body["reason"].startswith("backplane: ")
        reply = await running.post("/api/publish", {"type": "note", "data": 1})
        assert reply.status == 503
        assert "not published: Redis at" in reply.body["error"]["message"]
        assert reply.body["outcome"] == "not_published"
        samples = metric_samples((await running.get("/metrics")).text)
        assert samples[("wshub_backplane_ready", ())] == 0
        assert samples[("wshub_backplane_disconnects_total", ())] == 1
        assert samples[("wshub_publish_failures_total", ())] == 1

        redis_server.restart()
        await wait_until(lambda: running.hub.ready, timeout=15)
        assert (await running.get("/readyz")).status == 200
        reply = await running.post("/api/publish", {"type": "note", "data": 2})
        assert (reply.status, recipients_of(reply.body)) == (200, 1)
        assert (await recv_json(ws))["data"] == 2
        samples = metric_samples((await running.get("/metrics")).text)
        assert samples[("wshub_backplane_ready", ())] == 1
        assert samples[("wshub_backplane_reconnects_total", ())] == 1
        assert samples[("wshub_backplane_reconnect_attempts_total", ())] >= 1


# NethermindEth/json-bench's React dashboard (dashboard/src/types/api.ts): the JSON type of
# every key it reads from new_run (a HistoricRun), regression_detected (its Regression) and
# baseline_updated. Optional keys (`?` there) may be absent, never of another type.
STRING, NUMBER, BOOLEAN, STRINGS = "string", "number", "boolean", "string[]"
JSON_BENCH_TYPES: dict[str, dict[str, tuple[str, bool]]] = {
    "new_run": {
        **{
            key: (STRING, False)
            for key in (
                "id",
                "timestamp",
                "git_commit",
                "git_branch",
                "test_name",
                "description",
                "config_hash",
                "result_path",
                "duration",
                "best_client",
                "start_time",
                "end_time",
                "created_at",
            )
        },
        **{
            key: (NUMBER, False)
            for key in (
                "total_requests",
                "success_rate",
                "avg_latency_ms",
                "p95_latency_ms",
                "p99_latency_ms",
                "max_latency_ms",
                "total_errors",
                "overall_error_rate",
                "clients_count",
                "endpoints_count",
                "target_rps",
            )
        },
        **{key: (STRINGS, False) for key in ("clients", "methods", "tags")},
        "is_baseline": (BOOLEAN, False),
        "baseline_name": (STRING, True),
        "notes": (STRING, True),
        "full_results": (STRING, True),
    },
    "regression_detected": {
        "runId": (STRING, False),
        "baselineId": (STRING, False),
        "metricName": (STRING, False),
        "baselineValue": (NUMBER, False),
        "currentValue": (NUMBER, False),
        "percentChange": (NUMBER, False),
        "severity": (STRING, False),
    },
    "baseline_updated": {
        "runId": (STRING, False),
        "baselineName": (STRING, False),
        "action": (STRING, False),
    },
}


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int | float):
        return NUMBER
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return STRINGS
    return STRING if isinstance(value, str) else type(value).__name__


def assert_fits(kind: str, data: dict[str, Any]) -> None:
    """``data`` has every key json-bench's dashboard reads for ``kind``, each of its type."""
    for key, (expected, optional) in JSON_BENCH_TYPES[kind].items():
        if optional and key not in data:
            continue
        assert key in data, f"{kind}: the dashboard reads {key}, which is missing"
        assert json_type(data[key]) == expected, f"{kind}.{key}: {data[key]!r} is not {expected}"


STORED_RUN: dict[str, Any] = {
    "id": "run-42",
    "timestamp": "2026-12-02T09:30:00Z",
    "git_commit": "4f2a9c1",
    "git_branch": "main",
    "test_name": "eth_call",
    "description": "nightly",
    "config_hash": "c0ffee",
    "result_path": "results/run-42",
    "duration": "1m0s",
    "total_requests": 60000,
    "success_rate": 99.8,
    "avg_latency_ms": 12.5,
    "p95_latency_ms": 38.5,
    "p99_latency_ms": 61.0,
    "max_latency_ms": 240.0,
    "total_errors": 120,
    "overall_error_rate": 0.2,
    "clients": ["geth", "reth"],
    "methods": ["eth_call"],
    "tags": ["nightly"],
    "is_baseline": False,
    "best_client": "reth",
    "clients_count": 2,
    "endpoints_count": 2,
    "target_rps": 1000,
    "start_time": "2026-12-02T09:29:00Z",
    "end_time": "2026-12-02T09:30:00Z",
    "created_at": "2026-12-02T09:30:01Z",
    "full_results": '{"summary": {}}',
}


async def test_json_bench_format_is_what_its_dashboard_reads(api: ApiFactory) -> None:
    async with api(event_format="json-bench") as running, client(running.ws_url()) as (ws, _):
        await running.post("/api/notify/new_run", {"run": STORED_RUN})
        stored = await recv_json(ws)
        assert stored["type"] == "new_run"
        assert_fits("new_run", stored["data"])
        assert {key: stored["data"][key] for key in STORED_RUN} == STORED_RUN
        severities = {"low": "minor", "medium": "major", "high": "major", "critical": "critical"}
        for given, shown in severities.items():
            body = regression_body(severity=given)
            assert (await running.post("/api/notify/regression_detected", body)).status == 200
            found = await recv_json(ws)
            assert_fits("regression_detected", found["data"])
            assert found["data"] == {
                "runId": "run-42",
                "baselineId": "run-30",
                "metricName": "p95_latency_ms",
                "baselineValue": 41.2,
                "currentValue": 48.8,
                "percentChange": 18.4,
                "severity": shown,
            }
        for action in ("created", "updated", "deleted"):
            body = {
                "baseline_name": "main",
                "run_id": "run-42",
                "test_name": "t",
                "action": action,
            }
            assert (await running.post("/api/notify/baseline_updated", body)).status == 200
            moved = await recv_json(ws)
            assert_fits("baseline_updated", moved["data"])
            assert moved["data"] == {"runId": "run-42", "baselineName": "main", "action": action}
        # The other events keep their shape (the dashboard does not read them).
        failed = {"run_id": "run-43", "test_name": "t", "error": "x"}
        await running.post("/api/notify/run_failed", failed)
        assert (await recv_json(ws))["data"]["error"] == "x"


def regression_body(**fields: Any) -> dict[str, Any]:
    return {
        "regression": {
            "id": "reg-7",
            "run_id": "run-42",
            "baseline_run_id": "run-30",
            "metric": "p95_latency_ms",
            "baseline_value": 41.2,
            "current_value": 48.8,
            "percent_change": 18.4,
            "severity": "high",
            **fields,
        },
        "run": {"id": "run-42", "test_name": "eth_call"},
    }


async def test_json_bench_format_refuses_what_its_dashboard_cannot_show(api: ApiFactory) -> None:
    async with api(event_format="json-bench") as running, client(running.ws_url()) as (ws, _):
        for body, field in (
            (regression_body(baseline_value=None), "regression.baseline_value"),
            (regression_body(metric=""), "regression.metric"),
            (regression_body(severity="severe"), "regression.severity"),
        ):
            reply = await running.post("/api/notify/regression_detected", body)
            assert (reply.status, reply.body["error"]["field"]) == (400, field), reply.body
        reply = await running.post(
            "/api/notify/baseline_updated",
            {"baseline_name": "b", "run_id": "r", "test_name": "t", "action": "moved"},
        )
        assert (reply.status, reply.body["error"]["field"]) == (400, "action")
        await assert_nothing_published(running, ws)


def test_a_bad_event_format_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"^event_format must be one of wshub, json-bench"):
        wshub.HubConfig(event_format="json_bench")
