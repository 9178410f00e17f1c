"""The hub's client protocol through the session port, in memory: no socket, no transport.

:class:`~tests.memory.MemoryClient` implements :class:`wshub.session.ClientTransport`; these
tests drive the hub exactly as a transport does and read back what it wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import wshub
from wshub.auth import Grants, Principal
from wshub.session import Admission, FrameKind, HandshakeRequest, Refusal, admission_of

from .memory import MemoryClient


@pytest.fixture
async def hub(implementation: str) -> AsyncIterator[wshub.Hub]:
    hub = wshub.Hub(
        wshub.HubConfig(max_clients=2, client_buffer_size=4, log_connection_events=False),
        implementation=implementation,  # type: ignore[arg-type]
    )
    async with hub:
        yield hub


async def connect(hub: wshub.Hub, target: str = "/api/ws", **options: Any) -> MemoryClient:
    memory = MemoryClient(target=target, **options)
    opened = await memory.open(hub)
    assert not isinstance(opened, Refusal), opened
    return memory


@pytest.mark.parametrize("kind", list(FrameKind))
async def test_greeting_replies_and_publishes_reach_a_memory_client(
    hub: wshub.Hub, kind: FrameKind
) -> None:
    memory = await connect(hub, "/api/ws?topics=a", frame_kind=kind)
    memory.send({"type": "ping"})
    memory.send({"type": "subscribe", "data": {"topics": ["b"]}})
    assert hub.broadcast_to_subscribers("event", 1, ["a", "b"]) == 1
    hub.flush()
    greeting, pong, subscribed, event = memory.messages()
    assert (greeting["type"], greeting["data"]["topics"]) == ("connection", ["a"])
    assert pong["type"] == "pong"
    assert subscribed["data"]["topics"] == ["a", "b"]
    assert (event["type"], event["data"]) == ("event", 1)
    assert memory.writes == 1  # everything queued in one iteration leaves in one write


async def test_bad_input_is_answered_and_the_client_lives_on(hub: wshub.Hub) -> None:
    memory = await connect(hub)
    memory.send("{not json")
    memory.send({"type": "ping"})
    hub.flush()
    _, error, pong = memory.messages()
    assert (error["type"], error["error"]["code"]) == ("error", 400)
    assert pong["type"] == "pong"
    assert memory.close_frame is None
    assert hub.stats()["protocol_errors"] == 1


async def test_admission_refuses_past_max_clients_and_counts_it(hub: wshub.Hub) -> None:
    await connect(hub)
    await connect(hub)
    refused = await MemoryClient().open(hub)
    assert isinstance(refused, Refusal)
    assert (refused.status, refused.close_code) == (503, 1013)
    assert hub.stats()["rejected_connections"] == 1


async def test_admission_refuses_other_browser_origins(implementation: str) -> None:
    config = wshub.HubConfig(allowed_origins=["https://ok.example"], log_connection_events=False)
    async with wshub.Hub(config, implementation=implementation) as hub:  # type: ignore[arg-type]
        other = await MemoryClient(headers={"origin": "https://evil.example"}).open(hub)
        assert isinstance(other, Refusal) and other.status == 403
        assert not isinstance(
            await MemoryClient(headers={"origin": "https://ok.example"}).open(hub), Refusal
        )
        assert not isinstance(await MemoryClient().open(hub), Refusal)  # no Origin: not a browser


async def test_a_paused_client_that_overflows_is_closed_with_4008(hub: wshub.Hub) -> None:
    slow, healthy = await connect(hub), await connect(hub)
    assert slow.session is not None
    slow.session.pause_writing()
    for number in range(10):
        hub.broadcast_to_all("event", number)
    hub.flush()
    assert slow.close_frame == (4008, "slow consumer")
    assert [message["data"] for message in healthy.messages()[1:]] == list(range(10))
    assert hub.client_count == 1  # the slow one's transport reported its end


async def test_a_client_resumed_in_time_gets_what_was_kept(hub: wshub.Hub) -> None:
    memory = await connect(hub)
    assert memory.session is not None
    memory.session.pause_writing()
    hub.broadcast_to_all("event", 1)
    hub.flush()
    assert memory.messages() == []
    memory.session.resume_writing()
    assert [message["type"] for message in memory.messages()] == ["connection", "event"]


async def test_stop_says_goodbye_then_closes_with_1001(implementation: str) -> None:
    hub = wshub.Hub(
        wshub.HubConfig(log_connection_events=False),
        implementation=implementation,  # type: ignore[arg-type]
    )
    await hub.start()
    memory = await connect(hub)
    await asyncio.wait_for(hub.stop(), 5)
    assert memory.messages()[-1]["type"] == "disconnection"
    assert memory.close_frame == (1001, "server shutdown")
    assert hub.client_count == 0


async def test_admission_says_who_the_client_is_and_its_grants_filter_its_topics(
    implementation: str,
) -> None:
    def hook(request: HandshakeRequest) -> Principal:
        return Principal(request.headers.get("x-user"), Grants.of(["run:*"]))

    config = wshub.HubConfig(log_connection_events=False)
    async with wshub.Hub(config, implementation=implementation, authenticate=hook) as hub:  # type: ignore[arg-type]
        memory = MemoryClient(target="/api/ws?topics=run:1,test:x", headers={"x-user": "ci"})
        admission = await admission_of(hub, memory.request)
        assert isinstance(admission, Admission)
        assert admission.principal.identity == "ci"
        opened = hub.open_session(memory, admission)
        assert not isinstance(opened, Refusal)
        memory.session = opened
        memory.send({"type": "subscribe", "data": {"topics": ["run:2", "*"]}})
        hub.flush()
        greeting, url_error, subscribe_error, subscribed = memory.messages()
        assert greeting["data"]["topics"] == ["run:1"]
        assert url_error["error"]["details"]["forbidden"] == ["test:x"]
        assert subscribe_error["error"]["details"]["forbidden"] == ["*"]
        assert subscribed["data"]["topics"] == ["run:1", "run:2"]
        assert hub.client_info()[0]["identity"] == "ci"
