"""The servers the benchmark compares, behind one small interface.

Every variant sends the same envelope bytes for the same event, so clients cannot tell them
apart; what differs is how the server gets those bytes to N sockets:

``wshub-cython`` / ``wshub-python``
    A :class:`wshub.Hub` with that core behind :func:`wshub.serve`: serialize once, frame once,
    one write per client per loop iteration.
``websockets.broadcast``
    websockets' own server and ``broadcast()``, the envelope serialized once with orjson:
    what a careful websockets user writes.
``naive``
    ``await ws.send(json.dumps(envelope))`` for each client in turn: what a first version
    looks like.
``raw-write``
    A prebuilt frame handed to ``transport.write`` once per client per message: the ceiling
    for one write per message, with no framing or bookkeeping cost at all.
``wshub-aiohttp`` / ``wshub-asgi`` (only when asked for)
    The Cython hub behind :func:`wshub.aiohttp_handler` in an aiohttp application, or behind
    :func:`wshub.asgi_app` run by uvicorn (needs ``uvicorn``): what those transports cost
    beside the lean server, all else equal.
``picows`` (only when asked for; ``pip install picows``)
    picows' Cython WebSocket server, the envelope serialized once with orjson and sent with
    one ``transport.send`` per client per message: the fastest per-client send path among
    Python peers.
``socketify`` (only when asked for; ``pip install socketify``)
    socketify, uWebSockets' server behind CFFI, with uWebSockets' own pub/sub: every client
    holds a topic for "everyone" plus its own, and each message is one ``app.publish``; the
    C++ side queues it per subscriber and writes each socket once per loop iteration.
``wshub-deflate`` / ``websockets-deflate`` (only when asked for)
    Compression, for clients that offer permessage-deflate as every browser does (the
    benchmark's clients all offer it): the Cython hub with ``compression="deflate"``, one
    compression per message shared by every client, beside ``websockets.broadcast`` with
    websockets' default compression, a context and a compression per connection.
``wshub-sse`` (only when asked for)
    ``wshub-cython`` read as Server-Sent Events: the same hub, its clients on
    ``/api/events`` instead of WebSocket, each message one record built once and shared.
``wshub-cython-unbatched`` (only when asked for)
    The Cython hub flushing after every publish: one write per client per message, all else
    equal. Against ``wshub-cython`` it shows what coalescing writes buys.
``wshub-cython-N-nodes`` (``--nodes N``)
    N Cython hubs, each in a process of its own, joined by a Redis backplane; the clients are
    spread over them and node 0 publishes. Each node has the settings of ``wshub-cython``,
    except a history (and so a Redis stream) long enough for a whole round, so the two differ
    only in the backplane and in the number of processes sharing the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, broadcast
from websockets.asyncio.server import serve as websockets_serve

import wshub
from wshub import _fanout_py
from wshub.wire import MessageClock

from ..transports.events import EVENTS_PATH
from .transports import PATH as WS_PATH
from .transports import serve_over

__all__ = [
    "ALL_VARIANTS",
    "SINGLE_NODE",
    "VARIANTS",
    "NodeRole",
    "Variant",
    "client_path",
    "make_variant",
    "nodes_of",
    "nodes_variant",
]

VARIANTS = ("wshub-cython", "wshub-python", "websockets.broadcast", "naive", "raw-write")
UNBATCHED = "wshub-cython-unbatched"
#: The Cython hub over the other transports, by variant name.
OTHER_TRANSPORTS = {"wshub-aiohttp": "aiohttp", "wshub-asgi": "asgi"}
PICOWS = "picows"
SOCKETIFY = "socketify"
DEFLATE = "wshub-deflate"
WEBSOCKETS_DEFLATE = "websockets-deflate"
SSE = "wshub-sse"
EXTRA_VARIANTS = (
    UNBATCHED,
    DEFLATE,
    WEBSOCKETS_DEFLATE,
    SSE,
    *OTHER_TRANSPORTS,
    PICOWS,
    SOCKETIFY,
)
ALL_VARIANTS = (*VARIANTS, *EXTRA_VARIANTS)
BASELINE = "websockets.broadcast"
#: What joined nodes are compared with: the same hub, alone in one process.
SINGLE_NODE = "wshub-cython"
NODES_PREFIX, NODES_SUFFIX = "wshub-cython-", "-nodes"
MESSAGE_TYPE = "run_progress"
KEEPALIVE_OFF = 3600.0  # no ping lands inside a measured round


def envelope(clock: MessageClock, data: dict[str, Any]) -> dict[str, Any]:
    """The hub's envelope of an event, as the peers that are not wshub build it."""
    message_id, timestamp = clock.next()
    return {"type": MESSAGE_TYPE, "data": data, "timestamp": timestamp, "id": message_id}


def client_path(name: str) -> str:
    """Where the clients of variant ``name`` connect: the event stream for ``wshub-sse``,
    else the WebSocket endpoint."""
    return EVENTS_PATH if name == SSE else WS_PATH


def nodes_variant(nodes: int) -> str:
    """The name of ``nodes`` Cython hubs joined over Redis."""
    return f"{NODES_PREFIX}{nodes}{NODES_SUFFIX}"


def nodes_of(name: str) -> int:
    """How many hub processes variant ``name`` runs: N for joined nodes, else 1."""
    middle = name.removeprefix(NODES_PREFIX).removesuffix(NODES_SUFFIX)
    if name.startswith(NODES_PREFIX) and name.endswith(NODES_SUFFIX) and middle.isdigit():
        return int(middle)
    return 1


@dataclasses.dataclass(frozen=True)
class NodeRole:
    """How one of several joined hub nodes takes part in a round.

    Attributes:
        redis_url: The Redis that joins the nodes.
        stream: The round's own stream key, so that no round reads another's messages.
        publishes: True on the node that publishes the round's messages (node 0).
    """

    redis_url: str
    stream: str
    publishes: bool


class Variant:
    """One server under test. ``publish`` queues a batch of events in the current loop
    iteration (``naive`` cannot, and awaits its sends instead)."""

    name = ""

    def __init__(self, clients: int, batch_capacity: int) -> None:
        self.clients = clients
        self.batch_capacity = batch_capacity
        self.port = 0

    async def start(self, host: str) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def publish(self, events: Sequence[tuple[dict[str, Any], str | None]]) -> None:
        """Publish ``(data, topic)`` pairs; a None topic means every client."""
        raise NotImplementedError

    @property
    def connected(self) -> int:
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """Drops and slow-consumer disconnects, where the variant keeps such counts."""
        return {"drops": 0, "slow_consumer_disconnects": 0}


class HubVariant(Variant):
    def __init__(
        self,
        clients: int,
        batch_capacity: int,
        implementation: str,
        unbatched: bool = False,
        flush_interval: float = 0.0,
        role: NodeRole | None = None,
        transport: str = "lean",
        compression: str = "off",
    ) -> None:
        super().__init__(clients, batch_capacity)
        self.name = UNBATCHED if unbatched else f"wshub-{implementation}"
        self.transport = transport
        if transport != "lean":
            self.name = f"wshub-{transport}"
        if compression != "off":
            self.name = DEFLATE
        self.unbatched = unbatched
        self.joined = role is not None
        joined: dict[str, Any] = {}
        if role is not None:
            joined = {
                "redis_url": role.redis_url,
                "redis_stream": role.stream,
                # The stream is trimmed to the history's length; a node that falls behind
                # within a round must still find the round's messages there.
                "history_size": max(1000, batch_capacity),
            }
        config = wshub.HubConfig(
            max_clients=clients + 100,
            # Room for a whole round, so that a publisher outpacing the clients is measured
            # rather than turned into disconnects; clients that stop reading still overflow.
            client_buffer_size=max(256, batch_capacity),
            max_buffered_bytes=2**30,
            ping_interval=KEEPALIVE_OFF,
            pong_timeout=KEEPALIVE_OFF,
            log_connection_events=False,
            default_topics=(),
            flush_interval=flush_interval,
            compression=compression,
            **joined,
        )
        self.hub = wshub.Hub(config, implementation=implementation)  # type: ignore[arg-type]
        self._serving: contextlib.AbstractAsyncContextManager[Any] | None = None

    async def start(self, host: str) -> None:
        self._serving = serve_over(self.transport, self.hub, host)
        _, self.port = await self._serving.__aenter__()
        if self.joined and not self.hub.ready:
            backplane = self.hub.backplane
            why = getattr(backplane, "last_error", None) or "no answer"
            raise RuntimeError(f"this node cannot reach its Redis: {why}")

    async def stop(self) -> None:
        if self._serving is not None:
            await self._serving.__aexit__(None, None, None)

    async def publish(self, events: Sequence[tuple[dict[str, Any], str | None]]) -> None:
        hub = self.hub
        for data, topic in events:
            if topic is None:
                hub.broadcast_to_all(MESSAGE_TYPE, data)
            else:
                hub.broadcast_to_subscribers(MESSAGE_TYPE, data, (topic,))
            if self.unbatched:
                hub.flush()

    @property
    def connected(self) -> int:
        return self.hub.client_count

    def counters(self) -> dict[str, int]:
        stats = self.hub.stats()
        return {
            "drops": stats["drops"],
            "slow_consumer_disconnects": stats["slow_consumer_disconnects"],
            "publish_failures": stats["publish_failures"],
        }


class WebsocketsVariant(Variant):
    """The three peers share websockets' server; they differ in how they send."""

    def __init__(self, clients: int, batch_capacity: int, name: str) -> None:
        super().__init__(clients, batch_capacity)
        self.name = name
        self.everyone: dict[ServerConnection, None] = {}
        self.by_topic: dict[str, dict[ServerConnection, None]] = {}
        self.server: Server | None = None
        self.clock = MessageClock()

    async def handler(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(connection.request.path).query)
        topics = [name for value in query.get("topics", []) for name in value.split(",")]
        self.everyone[connection] = None
        for topic in topics:
            self.by_topic.setdefault(topic, {})[connection] = None
        try:
            await connection.wait_closed()
        finally:
            del self.everyone[connection]
            for topic in topics:
                self.by_topic[topic].pop(connection, None)

    async def start(self, host: str) -> None:
        self.server = await websockets_serve(
            self.handler,
            host,
            0,
            compression="deflate" if self.name == WEBSOCKETS_DEFLATE else None,
            ping_interval=None,
            max_queue=None,
            write_limit=2**30,  # like the hub's buffers: room for a whole round
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def envelope(self, data: dict[str, Any]) -> dict[str, Any]:
        return envelope(self.clock, data)

    def recipients(self, topic: str | None) -> dict[ServerConnection, None]:
        return self.everyone if topic is None else self.by_topic.get(topic, {})

    async def publish(self, events: Sequence[tuple[dict[str, Any], str | None]]) -> None:
        for data, topic in events:
            envelope = self.envelope(data)
            recipients = self.recipients(topic)
            if self.name in ("websockets.broadcast", WEBSOCKETS_DEFLATE):
                broadcast(recipients, orjson.dumps(envelope), text=True)
            elif self.name == "raw-write":
                frame = _fanout_py.build_frame(orjson.dumps(envelope))
                for connection in recipients:
                    connection.transport.write(frame)
            else:
                for connection in list(recipients):
                    await connection.send(json.dumps(envelope, separators=(",", ":")))

    @property
    def connected(self) -> int:
        return len(self.everyone)


class PicowsVariant(Variant):
    """picows' server; each message is one ``transport.send`` per recipient."""

    name = PICOWS

    def __init__(self, clients: int, batch_capacity: int) -> None:
        super().__init__(clients, batch_capacity)
        self.everyone: dict[Any, None] = {}
        self.by_topic: dict[str, dict[Any, None]] = {}
        self.server: Any = None
        self.clock = MessageClock()

    async def start(self, host: str) -> None:
        from picows import WSListener, WSMsgType, ws_create_server

        variant = self
        self.text = WSMsgType.TEXT

        class Listener(WSListener):
            def __init__(self, topics: list[str]) -> None:
                self.topics = topics
                self.transport: Any = None

            def on_ws_connected(self, transport: Any) -> None:
                self.transport = transport
                variant.everyone[self] = None
                for topic in self.topics:
                    variant.by_topic.setdefault(topic, {})[self] = None

            def on_ws_disconnected(self, transport: Any) -> None:
                variant.everyone.pop(self, None)
                for topic in self.topics:
                    variant.by_topic.get(topic, {}).pop(self, None)

        def listener(request: Any) -> Listener:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path.decode()).query)
            return Listener(
                [name for value in query.get("topics", []) for name in value.split(",")]
            )

        self.server = await ws_create_server(listener, host, 0, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            for listener in list(self.everyone):
                listener.transport.disconnect()
            self.server.close()
            await self.server.wait_closed()

    async def publish(self, events: Sequence[tuple[dict[str, Any], str | None]]) -> None:
        text = self.text
        for data, topic in events:
            payload = orjson.dumps(envelope(self.clock, data))
            recipients = self.everyone if topic is None else self.by_topic.get(topic, {})
            for listener in recipients:
                listener.transport.send(text, payload)

    @property
    def connected(self) -> int:
        return len(self.everyone)


class SocketifyVariant(Variant):
    """socketify's server; each message is one ``app.publish`` to a topic."""

    name = SOCKETIFY
    #: The topic every client holds, for messages to everyone.
    EVERYONE = "*"

    def __init__(self, clients: int, batch_capacity: int) -> None:
        super().__init__(clients, batch_capacity)
        self.open: dict[Any, None] = {}
        self.app: Any = None
        self.clock = MessageClock()

    async def start(self, host: str) -> None:
        from socketify import App, OpCode

        self.text = OpCode.TEXT
        # Made inside the running loop, socketify's loop wraps this asyncio loop (uvloop or
        # not) and drives its own libuv loop from it, as its App.run() does.
        app = self.app = App(lifespan=False)

        def upgrade(response: Any, request: Any, context: Any) -> None:
            topics = request.get_query("topics") or ""
            response.upgrade(
                request.get_header("sec-websocket-key"),
                request.get_header("sec-websocket-protocol"),
                request.get_header("sec-websocket-extensions"),
                context,
                [self.EVERYONE, *(name for name in topics.split(",") if name)],
            )

        def opened(ws: Any) -> None:
            for topic in ws.get_user_data():
                ws.subscribe(topic)
            self.open[ws.get_user_data_uuid()] = None

        def closed(ws: Any, code: int, message: Any) -> None:
            self.open.pop(ws.get_user_data_uuid(), None)

        def listening(config: Any) -> None:
            self.port = config.port

        app.ws(
            "/*",
            {
                "compression": 0,
                "max_payload_length": 2**20,
                "idle_timeout": 0,
                # Like the hub's buffers: room for a whole round.
                "max_backpressure": 2**30,
                "upgrade": upgrade,
                "open": opened,
                "close": closed,
            },
        )
        app.listen({"port": 0, "host": host}, listening)
        # What App.run() does before it runs the loop forever: start polling libuv.
        app.loop.started = True
        asyncio.get_running_loop().call_soon(app.loop._keep_alive)

    async def stop(self) -> None:
        if self.app is not None:
            self.app.loop.started = False  # stops the polling, not this loop
            self.app.close()

    async def publish(self, events: Sequence[tuple[dict[str, Any], str | None]]) -> None:
        app, text = self.app, self.text
        for data, topic in events:
            payload = orjson.dumps(envelope(self.clock, data))
            app.publish(self.EVERYONE if topic is None else topic, payload, text)

    @property
    def connected(self) -> int:
        return len(self.open)


def make_variant(
    name: str,
    clients: int,
    batch_capacity: int,
    flush_interval: float = 0.0,
    role: NodeRole | None = None,
) -> Variant:
    """The server for ``name``, sized for ``clients`` and a round of ``batch_capacity``;
    ``flush_interval`` is the wshub variants' ``HubConfig.flush_interval``; ``role`` joins
    one node of ``wshub-cython-N-nodes`` to the others.

    Raises:
        ValueError: ``name`` is unknown, or names joined nodes without a ``role``.
    """
    if nodes_of(name) > 1:
        if role is None:
            raise ValueError(f"{name} is one of several joined nodes: give its role")
        return HubVariant(
            clients, batch_capacity, "cython", flush_interval=flush_interval, role=role
        )
    if name == UNBATCHED:
        return HubVariant(clients, batch_capacity, "cython", unbatched=True)
    if name == SSE:
        variant = HubVariant(clients, batch_capacity, "cython", flush_interval=flush_interval)
        variant.name = SSE
        return variant
    if name == DEFLATE:
        return HubVariant(
            clients, batch_capacity, "cython", flush_interval=flush_interval, compression="deflate"
        )
    if name == WEBSOCKETS_DEFLATE:
        return WebsocketsVariant(clients, batch_capacity, name)
    if name == PICOWS:
        return PicowsVariant(clients, batch_capacity)
    if name == SOCKETIFY:
        return SocketifyVariant(clients, batch_capacity)
    if name in OTHER_TRANSPORTS:
        return HubVariant(
            clients,
            batch_capacity,
            "cython",
            flush_interval=flush_interval,
            transport=OTHER_TRANSPORTS[name],
        )
    if name.startswith("wshub-"):
        return HubVariant(
            clients, batch_capacity, name.removeprefix("wshub-"), flush_interval=flush_interval
        )
    if name in VARIANTS:
        return WebsocketsVariant(clients, batch_capacity, name)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")


def event_data(index: int, size: int) -> dict[str, Any]:
    """A ``run_progress`` event of about ``size`` bytes of JSON (at least its fields'),
    stamped with its send time.

    Past its fields, it carries the run's latest per-method figures, numbers that change from
    event to event as a runner's do, so that compression meets what it would in production
    (padding of one repeated letter would shrink a hundredfold)."""
    numbers = random.Random(index)
    data: dict[str, Any] = {
        "sent_at": time.time(),
        "run_id": "run-20261125-0042",
        "test_name": "eth_getLogs",
        "progress": round(index % 1000 / 1000, 3),
        "elapsed_s": round(12.5 + index * 0.2, 1),
        "requests_done": 15000 + 37 * index,
        "current_rps": round(numbers.uniform(900, 1500), 1),
        "error_rate": round(numbers.uniform(0, 0.01), 5),
    }
    budget = size - len(orjson.dumps(data)) - len(',"methods":[]')
    methods: list[dict[str, Any]] = []
    while budget > 0:
        method = {
            "method": _METHODS[len(methods) % len(_METHODS)],
            "p50_ms": round(numbers.uniform(1, 20), 2),
            "p99_ms": round(numbers.uniform(20, 400), 2),
            "rps": round(numbers.uniform(50, 900), 1),
        }
        budget -= len(orjson.dumps(method)) + 1
        methods.append(method)
    if methods:
        data["methods"] = methods
    return data


_METHODS = (
    "eth_call",
    "eth_getLogs",
    "eth_getBalance",
    "eth_blockNumber",
    "eth_getBlockByNumber",
    "eth_getTransactionReceipt",
)
