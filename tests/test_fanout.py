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

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.protocol import State

import wshub
from wshub import _fanout_py

from .memory import MemoryConnection

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
client_indexes = st.integers(0, 5)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("subscribe"), client_indexes, topic_sets),
        st.tuples(st.just("unsubscribe"), client_indexes, topic_sets),
        st.tuples(st.just("publish_topics"), json_values, topic_sets),
        st.tuples(st.just("publish_all"), json_values, st.just(None)),
        st.tuples(st.just("send"), client_indexes, json_values),
        st.tuples(st.just("flush"), st.just(None), st.just(None)),
        st.tuples(st.just("pause"), client_indexes, st.just(None)),
        st.tuples(st.just("resume"), client_indexes, st.just(None)),
        st.tuples(st.just("close"), client_indexes, st.just(None)),
        st.tuples(st.just("remove"), client_indexes, st.just(None)),
    ),
    max_size=60,
)


def run_core(
    core: ModuleType, ops: list[Any], buffer_size: int, max_bytes: int, drop_oldest: bool
) -> dict[str, Any]:
    """Apply ``ops`` to a fresh Fanout of ``core``; return everything observable."""
    loop = asyncio.new_event_loop()
    events: list[tuple[str, int]] = []
    connections = [MemoryConnection() for _ in range(6)]
    clients = [core.Client(f"{index:016x}", conn) for index, conn in enumerate(connections)]
    index_of = {id(client): index for index, client in enumerate(clients)}
    fanout = core.Fanout(
        loop,
        client_buffer_size=buffer_size,
        max_buffered_bytes=max_bytes,
        drop_oldest=drop_oldest,
        flush_interval=0.0,
        on_overflow=lambda client: events.append(("overflow", index_of[id(client)])),
        on_blocked=lambda client: events.append(("blocked", index_of[id(client)])),
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
                frame = envelope_frame(core, first, number)
                results.append(fanout.publish_topics(frame, second))
            elif kind == "publish_all":
                results.append(fanout.publish_all(envelope_frame(core, first, number)))
            elif kind == "send":
                results.append(fanout.send(clients[first], envelope_frame(core, second, number)))
            elif kind == "flush":
                fanout.flush()
            elif kind == "pause":
                connections[first].paused = True
            elif kind == "resume":
                connections[first].paused = False
                if clients[first].blocked:
                    fanout.unblock(clients[first])
            elif kind == "close":
                connections[first].protocol.state = State.CLOSING
            elif kind == "remove":
                fanout.remove_client(clients[first])
        fanout.flush()
    finally:
        fanout.close()
        loop.close()
    return {
        "results": results,
        "events": events,
        "written": [conn.transport.written for conn in connections],
        "per_client": [
            (c.messages_sent, c.messages_dropped, c.buffered_bytes, len(c.frames), c.closed)
            for c in clients
        ],
        "totals": (fanout.deliveries, fanout.drops, fanout.bytes_sent, fanout.writes),
    }


def envelope_frame(core: ModuleType, data: Any, number: int) -> bytes:
    payload = core.encode_envelope(
        "event", data, "2026-11-25T00:00:00.000Z", f"1-{number}", None, None
    )
    frame: bytes = core.build_frame(payload)
    return frame


@compiled_only
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=operations,
    buffer_size=st.integers(1, 6),
    max_bytes=st.integers(1, 600),
    drop_oldest=st.booleans(),
)
def test_both_cores_write_the_same_bytes_to_the_same_clients(
    core: ModuleType, ops: list[Any], buffer_size: int, max_bytes: int, drop_oldest: bool
) -> None:
    compiled = run_core(core, ops, buffer_size, max_bytes, drop_oldest)
    reference = run_core(_fanout_py, ops, buffer_size, max_bytes, drop_oldest)
    assert compiled == reference


@compiled_only
@settings(max_examples=200, deadline=None)
@given(
    message_type=st.text(min_size=1, max_size=20),
    data=json_values,
    message_id=st.none() | st.text(max_size=20),
    client_id=st.none() | st.text(max_size=16),
    error=st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_both_cores_encode_the_same_envelope(
    core: ModuleType,
    message_type: str,
    data: Any,
    message_id: str | None,
    client_id: str | None,
    error: Any,
) -> None:
    arguments = (message_type, data, "2026-11-25T00:00:00.000Z", message_id, client_id, error)
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
        drop_oldest=False,
    )
    assert outcome["results"][-1] == 2
    assert [len(written) for written in outcome["written"][:3]] == [1, 1, 0]
