"""The two fan-out cores: which one is picked, and that they behave identically.

The differential test drives both cores through the same random operations with in-memory
transports and compares every byte written, every return value and every callback.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

import wshub
from wshub import _fanout_py
from wshub.compression import SharedDeflate

from .memory import MemoryTransport, inflate, read_frames, split_frames

compiled_only = pytest.mark.parametrize("implementation", ["cython"], indirect=True)


@compiled_only
def test_a_normal_import_uses_the_compiled_core(core: ModuleType) -> None:
    assert wshub.IMPLEMENTATION == "cython"
    assert core.__file__ is not None and not core.__file__.endswith(".py")


def test_environment_variable_forces_the_python_core() -> None:
    probe = "import wshub; print(wshub.IMPLEMENTATION, wshub.Hub().implementation)"
    environment = {**os.environ, "WSHUB_NO_EXTENSIONS": "1"}
    output = subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True
    ).stdout
    assert output.split() == ["python", "python"]


def test_the_core_knows_nothing_of_websockets_and_shares_the_ports_frame_kinds(
    core: ModuleType,
) -> None:
    import inspect
    import pathlib

    import wshub.session

    twin = pathlib.Path(inspect.getfile(_fanout_py))
    for source in (twin, twin.with_name("_fanout.pyx")):
        imports = [
            line
            for line in source.read_text().splitlines()
            if line.startswith(("import ", "from ", "cimport "))
        ]
        assert imports and not [line for line in imports if "websockets" in line], source
    kinds = wshub.session.FrameKind
    assert (core.WEBSOCKET_FRAMES, core.TEXT_MESSAGES) == (
        kinds.WEBSOCKET_FRAMES,
        kinds.TEXT_MESSAGES,
    )
    assert set(core.FRAME_KINDS) == set(kinds)


def test_unknown_implementation_is_refused() -> None:
    with pytest.raises(ValueError, match="implementation"):
        wshub.Hub(implementation="rust")  # type: ignore[arg-type]


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_frames_match_the_websockets_serializer(core: ModuleType, length: int) -> None:
    payload = b"a" * length
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert core.build_frame(payload) == expected


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
topic_names = st.sampled_from(["*", "a", "b", "c", "run:1", "test:x"])
topic_sets = st.lists(topic_names, max_size=4)
client_indexes = st.integers(0, 7)
keys = st.sampled_from(["k1", "k2", "k3"])

operations = st.lists(
    st.one_of(
        st.tuples(st.just("subscribe"), client_indexes, topic_sets),
        st.tuples(st.just("unsubscribe"), client_indexes, topic_sets),
        st.tuples(st.just("publish_topics"), json_values, topic_sets),
        st.tuples(st.just("publish_keyed"), keys, topic_sets),
        st.tuples(st.just("publish_all_keyed"), keys, st.just(None)),
        st.tuples(st.just("publish_all"), json_values, st.just(None)),
        st.tuples(st.just("send"), client_indexes, json_values),
        st.tuples(st.just("flush"), st.just(None), st.just(None)),
        st.tuples(st.just("pause"), client_indexes, st.just(None)),
        st.tuples(st.just("resume"), client_indexes, st.just(None)),
        st.tuples(st.just("close"), client_indexes, st.just(None)),
        st.tuples(st.just("remove"), client_indexes, st.just(None)),
        st.tuples(st.just("break"), client_indexes, st.just(None)),
        st.tuples(st.just("mend"), client_indexes, st.just(None)),
    ),
    max_size=60,
)

# Weighted towards what conflation needs: paused clients and many keyed messages.
# (About a quarter of the examples conflate; a few compact a queue.)
conflating_operations = st.lists(
    st.one_of(
        st.tuples(st.just("pause"), client_indexes, st.just(None)),
        st.tuples(st.just("publish_all_keyed"), keys, st.just(None)),
        st.tuples(st.just("publish_all_keyed"), keys, st.just(None)),
        st.tuples(st.just("publish_all_keyed"), keys, st.just(None)),
        st.tuples(st.just("publish_keyed"), keys, topic_sets),
        st.tuples(st.just("publish_all"), json_values, st.just(None)),
        st.tuples(st.just("subscribe"), client_indexes, topic_sets),
        st.tuples(st.just("resume"), client_indexes, st.just(None)),
        st.tuples(st.just("flush"), st.just(None), st.just(None)),
    ),
    min_size=10,
    max_size=80,
)

# Clients 0, 2 and 3 take WebSocket frames, 1 and 6 compressed ones, 4-5 text messages, 7
# Server-Sent Events; client 3's write re-enters the core (it queues a reply for client 0 and
# pauses itself, as an asyncio transport's write may), and the on_blocked callback resumes
# client 5 at once, as a transport that drains fast does.
CLIENT_KINDS = (0, 2, 0, 0, 1, 1, 2, 3)
# Messages this long and longer are compressed: the operations publish both kinds.
DEFLATE_FROM = 60


def run_core(
    core: ModuleType,
    ops: list[Any],
    buffer_size: int,
    max_bytes: int,
    policy: int,
    flush_interval: float = 0.0,
) -> dict[str, Any]:
    """Apply ``ops`` to a fresh Fanout of ``core``; return everything observable."""
    loop = asyncio.new_event_loop()
    events: list[tuple[str, int]] = []
    transports = [MemoryTransport() for _ in CLIENT_KINDS]
    clients: list[Any] = []
    fanout: Any = None

    def reentrant_write(data: Any) -> None:
        transports[3].write(data)
        clients[3].writable = False
        fanout.send(clients[0], core.Message(b'{"type":"echo"}'))

    writes = [transport.write for transport in transports]
    writes[3] = reentrant_write
    clients.extend(
        core.Client(f"{index:016x}", write, kind)
        for index, (write, kind) in enumerate(zip(writes, CLIENT_KINDS, strict=True))
    )
    index_of = {id(client): index for index, client in enumerate(clients)}

    def blocked(client: Any) -> None:
        index = index_of[id(client)]
        events.append(("blocked", index))
        if index == 5:
            client.writable = True
            fanout.unblock(client)

    fanout = core.Fanout(
        loop,
        client_buffer_size=buffer_size,
        max_buffered_bytes=max_bytes,
        policy=policy,
        flush_interval=flush_interval,
        on_overflow=lambda client: events.append(("overflow", index_of[id(client)])),
        on_blocked=blocked,
        deflate=SharedDeflate(DEFLATE_FROM),
    )
    for client in clients:
        fanout.add_client(client)
    results: list[Any] = []
    try:
        for number, (kind, first, second) in enumerate(ops):
            if kind in ("subscribe", "unsubscribe"):
                getattr(fanout, kind)(clients[first], second)
                results.append(sorted(clients[first].topics))
            elif kind == "publish_topics":
                message = envelope_message(core, first, number)
                results.append(fanout.publish_topics(message, second))
            elif kind == "publish_keyed":
                message = envelope_message(core, number, number, key=first)
                results.append(fanout.publish_topics(message, second))
            elif kind == "publish_all_keyed":
                message = envelope_message(core, number, number, key=first)
                results.append(fanout.publish_all(message))
            elif kind == "publish_all":
                results.append(fanout.publish_all(envelope_message(core, first, number)))
            elif kind == "send":
                message = envelope_message(core, second, number)
                results.append(fanout.send(clients[first], message))
            elif kind == "flush":
                fanout.flush()
            elif kind == "pause":
                clients[first].writable = False
            elif kind == "resume":
                clients[first].writable = True
                if clients[first].blocked:
                    fanout.unblock(clients[first])
            elif kind == "close":
                fanout.close_client(clients[first])
            elif kind == "remove":
                fanout.remove_client(clients[first])
            elif kind == "break":
                transports[first].fail = True
            elif kind == "mend":
                transports[first].fail = False
            results.append(fanout.flush_handle is not None)
        fanout.flush()
    finally:
        fanout.close()
        loop.close()
    return {
        "results": results,
        "events": events,
        "written": [transport.written for transport in transports],
        "per_client": [
            (
                c.messages_sent,
                c.messages_dropped,
                c.conflated,
                c.holes,
                c.keys,
                c.buffered_bytes,
                len(c.frames),
                c.closed,
                c.blocked,
                c.writable,
            )
            for c in clients
        ],
        "totals": (
            fanout.deliveries,
            fanout.drops,
            fanout.conflations,
            fanout.bytes_sent,
            fanout.writes,
        ),
    }


def envelope_message(core: ModuleType, data: Any, number: int, key: str | None = None) -> Any:
    payload = core.encode_envelope(
        "event", data, "2026-11-25T00:00:00.000Z", f"1-{number}", None, None, key
    )
    return core.Message(payload, key, "event", f"1-{number}")


@compiled_only
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=operations,
    buffer_size=st.integers(1, 6),
    # Small byte caps overflow by bytes; the large one lets the count bound and conflation act.
    max_bytes=st.integers(1, 600) | st.just(100_000),
    policy=st.sampled_from(_fanout_py.POLICIES),
    flush_interval=st.sampled_from([0.0, 0.001]),
)
def test_both_cores_write_the_same_bytes_to_the_same_clients(
    core: ModuleType,
    ops: list[Any],
    buffer_size: int,
    max_bytes: int,
    policy: int,
    flush_interval: float,
) -> None:
    compiled = run_core(core, ops, buffer_size, max_bytes, policy, flush_interval)
    reference = run_core(_fanout_py, ops, buffer_size, max_bytes, policy, flush_interval)
    assert compiled == reference


@compiled_only
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=conflating_operations,
    buffer_size=st.integers(1, 6),
    max_bytes=st.integers(100, 2000) | st.just(100_000),
)
def test_both_cores_conflate_alike(
    core: ModuleType, ops: list[Any], buffer_size: int, max_bytes: int
) -> None:
    compiled = run_core(core, ops, buffer_size, max_bytes, core.CONFLATE)
    reference = run_core(_fanout_py, ops, buffer_size, max_bytes, _fanout_py.CONFLATE)
    assert compiled == reference


@compiled_only
@settings(max_examples=200, deadline=None)
@given(
    message_type=st.text(min_size=1, max_size=20),
    data=json_values,
    message_id=st.none() | st.text(max_size=20),
    client_id=st.none() | st.text(max_size=16),
    error=st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    key=st.none() | st.text(min_size=1, max_size=20),
)
def test_both_cores_encode_the_same_envelope(
    core: ModuleType,
    message_type: str,
    data: Any,
    message_id: str | None,
    client_id: str | None,
    error: Any,
    key: str | None,
) -> None:
    timestamp = "2026-11-25T00:00:00.000Z"
    arguments = (message_type, data, timestamp, message_id, client_id, error, key)
    payload = core.encode_envelope(*arguments)
    assert payload == _fanout_py.encode_envelope(*arguments)
    assert core.build_frame(payload) == _fanout_py.build_frame(payload)


def test_a_topic_message_reaches_each_client_once_in_the_reference_core() -> None:
    """The property the differential test extends to the compiled core."""
    outcome = run_core(
        _fanout_py,
        [
            ("subscribe", 0, ["a", "b", "*"]),
            ("subscribe", 1, ["b"]),
            ("publish_topics", "x", ["a", "b", "c"]),
        ],
        buffer_size=10,
        max_bytes=10_000,
        policy=_fanout_py.DISCONNECT,
    )
    assert outcome["results"][-2:] == [2, True]  # two recipients, a flush scheduled
    assert [len(written) for written in outcome["written"][:3]] == [1, 1, 0]


def make_fanout(core: ModuleType, loop: asyncio.AbstractEventLoop, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "client_buffer_size": 10,
        "max_buffered_bytes": 10_000,
        "policy": core.DISCONNECT,
        "flush_interval": 0.0,
        "on_overflow": lambda client: None,
        "on_blocked": lambda client: None,
    }
    options.update(overrides)
    return core.Fanout(loop, **options)


def test_each_frame_kind_is_built_once_only_when_a_recipient_needs_it(core: ModuleType) -> None:
    loop = asyncio.new_event_loop()
    try:
        fanout = make_fanout(core, loop)
        texts = [MemoryTransport() for _ in range(2)]
        for index, transport in enumerate(texts):
            fanout.add_client(core.Client(f"t{index}", transport.write, core.TEXT_MESSAGES))
        message = envelope_message(core, {"n": 1}, 1)
        assert fanout.publish_all(message) == 2
        # Only text recipients: no WebSocket frame was built.
        assert message.encodings[core.WEBSOCKET_FRAMES] is None
        frames = [MemoryTransport() for _ in range(3)]
        for index, transport in enumerate(frames):
            fanout.add_client(core.Client(f"f{index}", transport.write))
        second = envelope_message(core, {"n": 2}, 2)
        fanout.publish_all(second)
        fanout.flush()
        built = second.encodings[core.WEBSOCKET_FRAMES]
        assert built == core.build_frame(second.payload)
        # One object shared by every frame recipient, the payload itself by text ones.
        assert all(transport.written == [built] for transport in frames)
        assert [transport.written for transport in texts] == [
            [[message.payload, second.payload]]
        ] * 2
        assert second.encoded(core.WEBSOCKET_FRAMES) is built
        with pytest.raises(ValueError, match="frame kind"):
            core.Client("x", texts[0].write, 7)
    finally:
        loop.close()


def test_a_message_is_compressed_once_for_every_client_that_negotiated_it(
    core: ModuleType,
) -> None:
    loop = asyncio.new_event_loop()
    try:
        compressed: list[bytes] = []
        shared = SharedDeflate(min_size=100)

        def deflate(payload: bytes) -> bytes | None:
            compressed.append(payload)
            return shared(payload)

        fanout = make_fanout(core, loop, deflate=deflate)
        received: dict[str, list[Any]] = {}
        for name, kind in (("d0", 2), ("d1", 2), ("d2", 2), ("plain", 0), ("text", 1)):
            written = received[name] = []
            fanout.add_client(core.Client(name, written.append, kind))
        large = [envelope_message(core, {"run": "r" * 200, "n": n}, n) for n in range(3)]
        small = envelope_message(core, {"n": 9}, 9)
        for message in [*large, small]:
            fanout.publish_all(message)
            fanout.flush()
        # One compression per message that is large enough, whatever the recipients.
        assert compressed == [message.payload for message in large] + [small.payload]
        assert (shared.compressed, shared.plain) == (3, 1)
        # The very same bytes object to every compressed recipient.
        assert received["d0"][0] is received["d1"][0] is received["d2"][0]
        assert received["d0"][0] is not received["plain"][0]
        for name in ("d0", "d1", "d2"):
            frames = [frame for data in received[name] for frame in read_frames(data)]
            assert [flag for flag, _ in frames] == [True, True, True, False]
            assert [inflate(body) for _, body in frames[:3]] == [m.payload for m in large]
            assert frames[3][1] == small.payload
        plain = [payload for data in received["plain"] for payload in split_frames(data)]
        assert plain == [m.payload for m in [*large, small]]
        # A small message goes plain: its compressed encoding is its plain frame itself.
        assert small.encodings[core.DEFLATE_FRAMES] is small.encodings[core.WEBSOCKET_FRAMES]
        assert large[0].encoded(core.DEFLATE_FRAMES) == core.build_frame(
            shared(large[0].payload) or b"", compressed=True
        )
        with pytest.raises(ValueError, match="deflate"):
            envelope_message(core, {}, 10).encoded(core.DEFLATE_FRAMES)
    finally:
        loop.close()


@compiled_only
@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(max_size=60) | st.sampled_from([b"{\r\n}", b"a\rb\nc", b"\n"]),
    message_type=st.none() | st.text(max_size=12),
    message_id=st.none() | st.text(max_size=12),
)
def test_both_cores_build_the_same_event_records(
    core: ModuleType, payload: bytes, message_type: str | None, message_id: str | None
) -> None:
    built = core.build_event(payload, message_type, message_id)
    assert built == _fanout_py.build_event(payload, message_type, message_id)
    assert built.endswith(b"\n\n")
    message = core.Message(payload, None, message_type, message_id)
    assert message.encoded(core.SSE_EVENTS) == built


def parse_events(stream: bytes) -> list[dict[str, str]]:
    """Records as an EventSource reads them: its fields, ``data`` lines joined by ``\\n``."""
    records = []
    for block in stream.decode().split("\n\n")[:-1]:
        record: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            record[name] = record[name] + "\n" + value if name in record else value
        records.append(record)
    return records


def test_an_event_record_carries_the_id_type_and_envelope(core: ModuleType) -> None:
    message = envelope_message(core, {"n": 1}, 7)
    assert parse_events(message.encoded(core.SSE_EVENTS)) == [
        {"id": "1-7", "event": "event", "data": message.payload.decode()}
    ]
    # A reply has no id; a pretty-printed payload keeps its lines; a type that would break
    # the record's line is left out.
    reply = core.Message(b'{\n  "type": "x"\r\n}', None, "bad\ntype")
    assert parse_events(reply.encoded(core.SSE_EVENTS)) == [{"data": '{\n  "type": "x"\n}'}]


def test_a_write_that_raises_counts_its_frames_as_dropped(core: ModuleType) -> None:
    loop = asyncio.new_event_loop()
    try:
        fanout = make_fanout(core, loop)
        broken, healthy = MemoryTransport(), MemoryTransport()
        broken.fail = True
        clients = [core.Client("b", broken.write), core.Client("h", healthy.write)]
        for client in clients:
            fanout.add_client(client)
        for number in range(3):
            fanout.publish_all(envelope_message(core, number, number))
        fanout.flush()
        assert (clients[0].messages_sent, clients[0].messages_dropped) == (0, 3)
        assert (clients[1].messages_sent, len(healthy.written)) == (3, 1)
        assert fanout.drops == 3
    finally:
        loop.close()


# Conflation: what a client that fell behind keeps


def paused_client(core: ModuleType, fanout: Any, kind: int = 0) -> tuple[Any, MemoryTransport]:
    """A client subscribed to "t" whose transport is not writable."""
    transport = MemoryTransport()
    client = core.Client("c" * 16, transport.write, kind)
    fanout.add_client(client)
    fanout.subscribe(client, ["t"])
    client.writable = False
    return client, transport


def keyed(core: ModuleType, number: int, key: str | None) -> Any:
    return envelope_message(core, {"n": number}, number, key=key)


def numbers_written(transport: MemoryTransport) -> list[int]:
    """The ``data.n`` of every message written, frames and text messages alike."""
    payloads = [
        payload
        for written in transport.written
        for payload in (split_frames(written) if isinstance(written, bytes) else written)
    ]
    return [orjson.loads(payload)["data"]["n"] for payload in payloads]


@pytest.mark.parametrize("kind", [0, 1], ids=["frames", "text"])
async def test_conflation_keeps_the_latest_of_each_key_in_id_order(
    core: ModuleType, kind: int
) -> None:
    loop = asyncio.get_running_loop()
    fanout = make_fanout(core, loop, client_buffer_size=3, policy=core.CONFLATE)
    client, transport = paused_client(core, fanout, kind)
    for number, key in [(1, "run:1"), (2, None), (3, "run:2"), (4, "run:1"), (5, "run:2")]:
        assert fanout.publish_topics(keyed(core, number, key), ["t"]) == 1
    # 4 superseded 1 and 5 superseded 3: the newer one queued at the end, so ids still rise.
    assert (client.conflated, fanout.conflations, client.closed) == (2, 2, False)
    client.writable = True
    fanout.unblock(client)
    assert numbers_written(transport) == [2, 4, 5]
    assert (client.messages_sent, client.messages_dropped, client.holes) == (3, 0, 0)
    assert client.buffered_bytes == 0


async def test_conflation_disconnects_a_client_when_nothing_can_be_superseded(
    core: ModuleType,
) -> None:
    overflowed: list[Any] = []
    loop = asyncio.get_running_loop()
    fanout = make_fanout(
        core, loop, client_buffer_size=2, policy=core.CONFLATE, on_overflow=overflowed.append
    )
    events, _ = paused_client(core, fanout)
    for number in (1, 2):
        fanout.publish_topics(keyed(core, number, None), ["t"])
    # Full of events: a third event cannot take anyone's place.
    assert fanout.publish_topics(keyed(core, 3, None), ["t"]) == 0
    assert overflowed == [events] and events.closed
    assert (events.messages_dropped, events.conflated) == (3, 0)
    # Full of other keys: a new key supersedes nothing either.
    states, _ = paused_client(core, fanout)
    for number, key in [(1, "a"), (2, "b")]:
        fanout.publish_topics(keyed(core, number, key), ["t"])
    assert fanout.publish_topics(keyed(core, 3, "c"), ["t"]) == 0
    assert overflowed == [events, states]


async def test_a_long_stall_keeps_a_conflating_queue_bounded(core: ModuleType) -> None:
    loop = asyncio.get_running_loop()
    fanout = make_fanout(core, loop, client_buffer_size=2, policy=core.CONFLATE)
    client, transport = paused_client(core, fanout)
    fanout.publish_topics(keyed(core, 0, None), ["t"])
    for number in range(1, 1001):
        fanout.publish_topics(keyed(core, number, "run:1"), ["t"])
        assert len(client.frames) <= 2 * 2 + 1
    client.writable = True
    fanout.unblock(client)
    assert numbers_written(transport) == [0, 1000]
    assert client.conflated == 999


async def test_a_writable_client_gets_every_keyed_message(core: ModuleType) -> None:
    """Conflation is for clients that fell behind: a burst to a healthy one is written."""
    loop = asyncio.get_running_loop()
    fanout = make_fanout(core, loop, client_buffer_size=2, policy=core.CONFLATE)
    transport = MemoryTransport()
    client = core.Client("c" * 16, transport.write)
    fanout.add_client(client)
    for number in range(5):
        fanout.publish_all(keyed(core, number, "run:1"))
    fanout.flush()
    assert numbers_written(transport) == [0, 1, 2, 3, 4]
    assert client.conflated == 0


def test_the_cores_refuse_an_unknown_policy_and_a_key_that_is_not_a_string(
    core: ModuleType,
) -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="policy"):
            make_fanout(core, loop, policy=7)
    finally:
        loop.close()
    with pytest.raises(TypeError, match="key"):
        core.Message(b"{}", 42)
