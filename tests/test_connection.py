"""serve() and the handshake: paths, limits, origins, frame size, heartbeats, own handlers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as websockets_serve
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.protocol import State

import wshub
from wshub.transports.websockets import HubServerConnection

from .helpers import client, recv_json, send_json, wait_until


async def test_other_paths_get_404(hub_server: Any) -> None:
    async with hub_server() as served:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(served.url.replace("/api/ws", "/elsewhere")):
                pass
        assert refused.value.response.status_code == 404


async def test_the_public_port_tells_a_client_on_the_wrong_path_the_right_one(
    lean_server: Any,
) -> None:
    async with lean_server() as served:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(served.url.replace("/api/ws", "/ws")):
                pass
        response = refused.value.response
        assert response.status_code == 404
        assert response.body == b"Not Found: the WebSocket endpoint here is /api/ws\n"


async def test_handshakes_past_max_clients_get_503(hub_server: Any) -> None:
    async with hub_server(max_clients=2) as served:
        async with client(served.url), client(served.url):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(served.url):
                    pass
            assert refused.value.response.status_code == 503
            assert served.hub.stats()["rejected_connections"] == 1
        await wait_until(lambda: served.hub.client_count == 0)
        async with client(served.url):  # room again
            assert served.hub.client_count == 1


async def test_allowed_origins_refuse_other_browsers_with_403(hub_server: Any) -> None:
    async with hub_server(allowed_origins=["https://dash.example"]) as served:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(served.url, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        async with client(served.url, origin="https://dash.example"):
            pass
        async with client(served.url):  # not a browser: no Origin header
            pass


async def test_frame_over_max_message_size_closes_with_1009(hub_server: Any) -> None:
    async with hub_server(max_message_size=1024) as served, client(served.url) as (ws, _):
        await ws.send("x" * 2048)
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_unanswered_pings_close_with_1011(lean_server: Any) -> None:
    async with (
        lean_server(ping_interval=0.1, pong_timeout=0.2, write_timeout=5.0) as served,
        client(served.url) as (ws, hello),
    ):
        session = served.hub.session(hello["client_id"])
        assert session is not None
        connection = session.transport  # the server side of the client's connection
        ws.transport.pause_reading()  # the client stops answering pings
        await wait_until(lambda: connection.state is not State.OPEN)
        ws.transport.resume_reading()
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_heartbeat_off_sends_no_pings(hub_server: Any) -> None:
    async with (
        hub_server(enable_ping_pong=False, ping_interval=0.05, pong_timeout=0.05) as served,
        client(served.url, ping_interval=None) as (ws, _),
    ):
        ws.transport.pause_reading()
        await asyncio.sleep(0.3)  # six ping intervals: with pings on this would close
        ws.transport.resume_reading()
        await send_json(ws, {"type": "ping"})
        assert (await recv_json(ws))["type"] == "pong"
        assert served.hub.client_count == 1


async def test_silent_client_closes_after_read_timeout_without_heartbeat(
    hub_server: Any,
) -> None:
    async with (
        hub_server(enable_ping_pong=False, read_timeout=0.2) as served,
        client(served.url, ping_interval=None) as (ws, _),
    ):
        with pytest.raises(ConnectionClosedError) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1011, "read timeout")


async def test_register_serves_connections_from_an_own_handler(implementation: str) -> None:
    hub = wshub.Hub(
        wshub.HubConfig(log_connection_events=False),
        implementation=implementation,  # type: ignore[arg-type]
    )

    async def handler(connection: ServerConnection) -> None:
        assert connection.request is not None
        if connection.request.path.startswith("/events"):
            await hub.register(connection)
        else:
            await connection.close(4000, "not here")

    async with hub, websockets_serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with client(f"ws://127.0.0.1:{port}/events?topics=a") as (ws, hello):
            assert hello["data"]["topics"] == ["a"]
            assert hub.broadcast_to_subscribers("e", 1, ["a"]) == 1
            assert (await recv_json(ws))["data"] == 1


async def test_register_closes_with_1013_past_max_clients(implementation: str) -> None:
    """Without wshub.serve's 503 before the handshake, the handler itself refuses."""
    hub = wshub.Hub(
        wshub.HubConfig(max_clients=1, log_connection_events=False),
        implementation=implementation,  # type: ignore[arg-type]
    )
    async with hub, websockets_serve(hub.handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        async with client(url), connect(url) as refused:
            with pytest.raises(ConnectionClosedError) as closed:
                await refused.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1013, "Too many clients")
        assert hub.stats()["rejected_connections"] == 1


async def test_server_options_follow_the_config() -> None:
    hub = wshub.Hub(
        wshub.HubConfig(
            max_message_size=1000,
            ping_interval=5.0,
            pong_timeout=6.0,
            open_timeout=7.0,
            write_timeout=8.0,
            allowed_origins=["https://a.example"],
        )
    )
    options = wshub.server_options(hub)
    assert options["compression"] is None
    assert options["max_size"] == 1000
    assert (options["ping_interval"], options["ping_timeout"]) == (5.0, 6.0)
    assert (options["open_timeout"], options["close_timeout"]) == (7.0, 8.0)
    assert options["create_connection"] is HubServerConnection
    quiet = wshub.server_options(wshub.Hub(wshub.HubConfig(enable_ping_pong=False)))
    assert quiet["ping_interval"] is None and quiet["ping_timeout"] is None


class _BrokenAdmission(wshub.Hub):
    """A hub whose admission fails on a header: a bug in it must not hang the client."""

    def admit(self, request: wshub.HandshakeRequest) -> Any:
        if "x-break" in request.headers:
            raise RuntimeError("admission bug")
        return super().admit(request)


async def test_a_failing_admission_answers_500_and_the_server_serves_on(hub_server: Any) -> None:
    async with hub_server(hub_class=_BrokenAdmission) as served:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(served.url, additional_headers={"X-Break": "1"}):
                pass
        assert refused.value.response.status_code == 500
        async with client(served.url) as (ws, _):
            await send_json(ws, {"type": "ping"})
            assert (await recv_json(ws))["type"] == "pong"
