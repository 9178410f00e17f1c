"""wshub.Publisher against a real hub and its internal API."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from wshub.api import start_api
from wshub.publisher import Publisher, PublishError

from .helpers import client, recv_json


async def test_publish_and_notify_reach_subscribers(lean_server: Any) -> None:
    async with lean_server() as served, await start_api(served.hub, port=0) as api:
        publisher = Publisher(api.url)
        async with client(served.url + "?topics=news,test:t1") as (ws, _):
            assert await asyncio.to_thread(publisher.publish, "headline", {"n": 1}, ["news"]) == 1
            assert (await recv_json(ws))["data"] == {"n": 1}
            count = await asyncio.to_thread(
                publisher.notify, "run_failed", run_id="r1", test_name="t1", error="boom"
            )
            assert count == 1
            failed = await recv_json(ws)
            assert failed["type"] == "run_failed" and failed["data"]["error"] == "boom"


async def test_refusals_carry_status_and_field(lean_server: Any) -> None:
    async with (
        lean_server() as served,
        await start_api(served.hub, port=0, publish_token="t") as api,
    ):
        with pytest.raises(PublishError) as refused:
            await asyncio.to_thread(Publisher(api.url).publish, "x")
        assert refused.value.status == 401
        with pytest.raises(PublishError) as bad:
            await asyncio.to_thread(
                Publisher(api.url, token="t").notify, "run_progress", run_id="r", test_name="t"
            )
        assert bad.value.status == 400 and bad.value.field == "progress"


def test_unreachable_hub() -> None:
    with pytest.raises(PublishError, match="cannot reach") as refused:
        Publisher("http://127.0.0.1:1", timeout=2, retry_for=0).publish("x")
    assert refused.value.status is None
