"""MemoryHistory on its own: bounds, expiry, matching, and what a resume is told."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from wshub.history import MemoryHistory, Replay, missed
from wshub.settings import load_settings
from wshub.wire import ProtocolError, parse_message_id


class Clock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def filled(history: MemoryHistory, count: int, start: int = 1) -> list[bytes]:
    """Append ``count`` messages ``"1000-<n>"`` to topic ``t<n % 2>``; their frames."""
    frames = []
    for n in range(start, start + count):
        frame = f"frame {n}".encode()
        history.append(f"1000-{n}", [f"t{n % 2}"], frame)
        frames.append(frame)
    return frames


def test_since_returns_the_recorded_frames_themselves_in_order() -> None:
    history = MemoryHistory(10, 60.0)
    frames = filled(history, 5)
    replay = history.since("1000-2", {"*"})
    assert replay == Replay(True, None, frames[2:])
    assert all(got is sent for got, sent in zip(replay.frames, frames[2:], strict=True))
    assert history.since("1000-5", {"*"}) == Replay(True, None, [])


def test_topics_and_messages_to_everyone_match() -> None:
    history = MemoryHistory(10, 60.0)
    history.append("1000-1", ["a"], b"a")
    history.append("1000-2", None, b"all")
    history.append("1000-3", ["b", "c"], b"bc")
    history.append("1000-4", ["d"], b"d")
    assert history.since("1000-1", {"c"}).frames == [b"all", b"bc"]
    assert history.since("1000-1", set()).frames == [b"all"]
    assert history.since("1000-1", {"*"}).frames == [b"all", b"bc", b"d"]


def test_what_arrived_live_is_left_out() -> None:
    history = MemoryHistory(10, 60.0)
    history.append("1000-1", ["a"], b"1")
    history.append("1000-2", ["b"], b"2")
    history.append("1000-3", None, b"3")  # after the client joined: arrived live
    history.append("1000-4", ["b"], b"4")  # live too (held b)
    history.append("1000-5", ["a"], b"5")  # not held: missed
    replay = history.since("0-0", {"a", "b"}, delivered_after="1000-2", delivered_topics={"b"})
    assert replay == Replay(False, "unknown message id", [])
    replay = history.since("1000-1", {"a", "b"}, delivered_after="1000-2", delivered_topics={"b"})
    assert replay == Replay(True, None, [b"2", b"5"])


def test_overflow_evicts_the_oldest_and_says_how_far_back_it_reaches() -> None:
    history = MemoryHistory(3, 60.0)
    frames = filled(history, 10)
    assert len(history) == 3
    assert history.since("1000-7", {"*"}) == Replay(True, None, frames[7:])  # the last evicted
    assert history.since("1000-6", {"*"}) == Replay(
        False, "history does not reach back to 1000-6", []
    )


def test_expired_messages_leave_the_history() -> None:
    clock = Clock()
    history = MemoryHistory(100, 5.0, clock=clock)
    filled(history, 2)
    clock.now += 3
    frames = filled(history, 2, start=3)
    clock.now += 2.5  # the first two are 5.5 s old
    assert history.since("1000-2", {"*"}) == Replay(True, None, frames)
    assert history.since("1000-1", {"*"}).reason == "history does not reach back to 1000-1"
    assert len(history) == 2
    clock.now += 10
    assert history.since("1000-4", {"*"}) == Replay(True, None, [])  # saw the newest
    assert history.since("1000-3", {"*"}).recovered is False
    assert len(history) == 0


@pytest.mark.parametrize(("size", "ttl"), [(0, 60.0), (10, 0.0)])
def test_disabled(size: int, ttl: float) -> None:
    history = MemoryHistory(size, ttl)
    filled(history, 3)
    assert len(history) == 0
    assert history.since("1000-1", {"*"}) == Replay(False, "history is disabled", [])


@pytest.mark.parametrize("since", ["999-0", "1000-0", "1000-4", "1000-99", "2000-0"])
def test_ids_this_history_never_held_are_unknown(since: str) -> None:
    history = MemoryHistory(10, 60.0)
    for n in (1, 2, 3, 5):
        history.append(f"1000-{n}", None, b"x")
    assert history.since(since, {"*"}) == Replay(False, "unknown message id", [])


def test_ids_compare_as_integer_pairs() -> None:
    history = MemoryHistory(10, 60.0)
    history.append("999-10", None, b"a")
    history.append("1000-2", None, b"b")
    history.append("1000-10", None, b"c")
    assert history.since("999-10", {"*"}).frames == [b"b", b"c"]
    assert history.since("1000-2", {"*"}).frames == [b"c"]


@pytest.mark.parametrize("since", ["", "1", "a-1", "1-2-3", " 1-2", "\uff11-2"])
def test_malformed_ids_raise_protocol_errors(since: str) -> None:
    with pytest.raises(ProtocolError, match="since"):
        MemoryHistory(10, 60.0).since(since, {"*"})


def test_settings_reach_the_history_fields() -> None:
    settings = load_settings(
        {"history_size": "50"}, environ={"WSHUB_HISTORY_TTL": "2.5", "WSHUB_HISTORY_SIZE": "9"}
    )
    assert (settings.hub.history_size, settings.hub.history_ttl) == (50, 2.5)


def _reference(
    published: list[tuple[str, list[str] | None]],
    kept: int,
    since: str,
    topics: set[str],
    delivered_after: str | None,
    delivered_topics: set[str],
) -> Replay:
    """The rule of History.since, written as plainly as possible: a scan of every message."""
    retained = published[-kept:]
    evicted = published[-kept - 1][0] if len(published) > kept else None
    key = parse_message_id(since)
    ids = [parse_message_id(message_id) for message_id, _ in retained]
    if key not in ids:
        if ids and key > ids[0]:  # between two retained ids, or after the newest
            return Replay(False, "unknown message id", [])
        if evicted is None or key > parse_message_id(evicted):
            return Replay(False, "unknown message id", [])
        if key < parse_message_id(evicted):
            return Replay(False, f"history does not reach back to {since}", [])
    after = parse_message_id(delivered_after) if delivered_after is not None else None
    frames = [
        message_id
        for message_id, message_topics in retained
        if parse_message_id(message_id) > key
        and missed(parse_message_id(message_id), message_topics, topics, after, delivered_topics)
    ]
    return Replay(True, None, frames)


TOPIC_NAMES = st.sampled_from(["a", "b", "c", "*"])


@given(
    published=st.lists(
        st.one_of(st.none(), st.lists(st.sampled_from("abc"), max_size=3)), max_size=12
    ),
    kept=st.integers(1, 8),
    since_index=st.integers(0, 13),
    between=st.booleans(),
    topics=st.sets(TOPIC_NAMES, max_size=3),
    delivered=st.one_of(st.none(), st.integers(0, 26)),
    delivered_topics=st.sets(TOPIC_NAMES, max_size=2),
)
@example(
    published=[["a"], ["b"], ["a", "b"], None, ["c"]],
    kept=5,
    since_index=1,
    between=False,
    topics={"b", "a"},
    delivered=None,
    delivered_topics=set(),
)
@settings(max_examples=300, derandomize=True)  # seeded: CI repeats the same cases
def test_since_agrees_with_a_plain_scan(
    published: list[list[str] | None],
    kept: int,
    since_index: int,
    between: bool,
    topics: set[str],
    delivered: int | None,
    delivered_topics: set[str],
) -> None:
    """The per-topic index answers exactly what a scan of the whole history would."""
    history = MemoryHistory(kept, 60.0)
    messages = [(f"100-{2 * n + 2}", message_topics) for n, message_topics in enumerate(published)]
    for message_id, message_topics in messages:
        history.append(message_id, message_topics, message_id)
    # Message n has id 100-(2n + 2): mostly a published id (kept or evicted), sometimes one
    # between two of them.
    since_id = f"100-{max(0, 2 * since_index - between)}"
    delivered_id = f"100-{delivered}" if delivered is not None else None
    expected = _reference(messages, kept, since_id, topics, delivered_id, delivered_topics)
    got = history.since(
        since_id, topics, delivered_after=delivered_id, delivered_topics=delivered_topics
    )
    assert got == expected
