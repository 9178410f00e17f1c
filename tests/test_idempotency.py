"""The idempotency window of one process, sans I/O (over sockets: test_backplane, test_api)."""

from __future__ import annotations

import pytest

from wshub.idempotency import MAX_KEY_LENGTH, IdempotencyKeys, check_idempotency_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_remembered_for_its_window_from_the_first_publish() -> None:
    clock = Clock()
    keys = IdempotencyKeys(10.0, clock=clock)
    keys.put("a", "1-0")
    clock.now = 5.0
    keys.put("b", "2-0")
    assert (keys.get("a"), keys.get("b")) == ("1-0", "2-0")
    clock.now = 10.0
    assert (keys.get("a"), keys.get("b"), len(keys)) == (None, "2-0", 1)
    clock.now = 15.0
    assert (keys.get("b"), len(keys)) == (None, 0)


def test_past_max_keys_the_oldest_go_first() -> None:
    keys = IdempotencyKeys(10.0, max_keys=2, clock=Clock())
    for n in range(3):
        keys.put(str(n), f"{n}-0")
    assert [keys.get(str(n)) for n in range(3)] == [None, "1-0", "2-0"]


@pytest.mark.parametrize(
    ("key", "error"), [("", ValueError), ("k" * (MAX_KEY_LENGTH + 1), ValueError), (1, TypeError)]
)
def test_unusable_keys_are_refused(key: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^idempotency_key must be"):
        check_idempotency_key(key)
    assert check_idempotency_key("k" * MAX_KEY_LENGTH) == "k" * MAX_KEY_LENGTH
