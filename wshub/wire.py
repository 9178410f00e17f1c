"""The wire protocol's rules: message types, ids, timestamps, topics and client messages.

Each rule lives here once: what a topic may be, which types the protocol reserves, the JSON
options of every serialized message, and how a client message is parsed.

Every server message is one JSON text frame holding the envelope
``{"type", "data"?, "timestamp", "id"?, "client_id"?, "error"?}``; docs/protocol.md describes
it in full. Clients send ``subscribe``, ``unsubscribe``, ``ping`` and ``pong``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import time
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = [
    "JSON_OPTIONS",
    "MAX_TOPIC_LENGTH",
    "PROTOCOL_TYPES",
    "ClientRequest",
    "MessageClock",
    "MessageTooLarge",
    "MessageType",
    "ProtocolError",
    "check_envelope_size",
    "check_message_key",
    "check_message_type",
    "did_you_mean",
    "parse_client_message",
    "parse_message_id",
    "parse_topics",
    "rfc3339",
    "shown",
    "topic_list",
    "topic_problem",
]

JSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS
"""orjson options of every serialized message: naive datetimes in runner payloads are UTC,
and RFC 3339 wants the "Z"."""

MAX_TOPIC_LENGTH = 256


class MessageType(enum.StrEnum):
    """Every ``type`` the hub sends or understands."""

    NEW_RUN = "new_run"
    REGRESSION_DETECTED = "regression_detected"
    BASELINE_UPDATED = "baseline_updated"
    ANALYSIS_COMPLETE = "analysis_complete"
    RUN_STARTED = "run_started"
    RUN_PROGRESS = "run_progress"
    RUN_COMPLETE = "run_complete"
    RUN_FAILED = "run_failed"
    CONNECTION = "connection"
    DISCONNECTION = "disconnection"
    ERROR = "error"
    GAP = "gap"
    PING = "ping"
    PONG = "pong"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    REFRESH = "refresh"
    REFRESHED = "refreshed"
    TOKEN_EXPIRED = "token_expired"


PROTOCOL_TYPES = frozenset(
    {
        MessageType.CONNECTION,
        MessageType.DISCONNECTION,
        MessageType.ERROR,
        MessageType.GAP,
        MessageType.PING,
        MessageType.PONG,
        MessageType.SUBSCRIBE,
        MessageType.UNSUBSCRIBE,
        MessageType.SUBSCRIBED,
        MessageType.UNSUBSCRIBED,
        MessageType.REFRESH,
        MessageType.REFRESHED,
        MessageType.TOKEN_EXPIRED,
    }
)
"""Types the protocol itself uses; publishing one would confuse clients, so it is refused."""

CLIENT_MESSAGE_TYPES = frozenset(
    {
        MessageType.SUBSCRIBE,
        MessageType.UNSUBSCRIBE,
        MessageType.PING,
        MessageType.PONG,
        MessageType.REFRESH,
    }
)


# How much of a client's value an error may echo back: enough to see what was wrong, never
# an unbounded or deeply nested value that would cost the hub to encode or fail to encode.
SHOWN_STRING = 64
SHOWN_ITEMS = 10
SHOWN_DEPTH = 3


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to a misspelt ``word``, or ``""``:
    the tail of an error that names an unknown key."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def shown(value: Any, depth: int = 0) -> Any:
    """``value`` cut down for an error's ``details``: strings to :data:`SHOWN_STRING`
    characters, containers to :data:`SHOWN_ITEMS` entries and :data:`SHOWN_DEPTH` levels,
    anything that is not JSON to its type's name."""
    if isinstance(value, str):
        return value if len(value) <= SHOWN_STRING else value[:SHOWN_STRING] + "..."
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        # orjson writes 64-bit integers only; a bigger one is shown as text.
        return value if -(2**63) <= value < 2**64 else shown(str(value))
    if isinstance(value, list | tuple | dict):
        if depth >= SHOWN_DEPTH:
            return "..."
        if isinstance(value, dict):
            entries = list(value.items())
            result: Any = {
                shown(str(key)): shown(item, depth + 1) for key, item in entries[:SHOWN_ITEMS]
            }
            if len(entries) > SHOWN_ITEMS:
                result["..."] = f"{len(entries) - SHOWN_ITEMS} more"
            return result
        result = [shown(item, depth + 1) for item in value[:SHOWN_ITEMS]]
        if len(value) > SHOWN_ITEMS:
            result.append(f"... {len(value) - SHOWN_ITEMS} more")
        return result
    return type(value).__name__


# What an envelope adds to its type and data: the keys, the quotes, a timestamp
# ("2026-12-02T02:19:14.123Z") and an id of two 20-digit numbers, rounded up.
ENVELOPE_OVERHEAD = 128


class MessageTooLarge(ValueError):
    """A published message would be larger than ``max_publish_size``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the message would be {size} bytes, larger than max_publish_size ({limit} bytes)"
        )
        self.size = size
        self.limit = limit


def check_envelope_size(message_type: str, data_size: int, limit: int) -> None:
    """Refuse a message whose envelope, around ``data_size`` bytes of data, could exceed
    ``limit`` bytes.

    Raises:
        MessageTooLarge: It could.
    """
    size = data_size + len(message_type.encode()) + ENVELOPE_OVERHEAD
    if size > limit:
        raise MessageTooLarge(size, limit)


class ProtocolError(ValueError):
    """A client message the hub cannot act on; answered with an ``error`` envelope.

    Attributes:
        message: What was wrong, for people.
        details: Machine-readable context (the offending value, the limit), or None.
        code: The error code of the envelope (400: the client's fault).
    """

    def __init__(self, message: str, details: Any = None, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.code = code

    def to_error(self) -> dict[str, Any]:
        """The ``error`` object of the envelope; what it echoes of the client is bounded."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = shown(self.details)
        return error


@dataclasses.dataclass(frozen=True, slots=True)
class ClientRequest:
    """One parsed client message: its type and, for (un)subscribe, the topics it names;
    for subscribe, the ``since`` id to resume after (None when absent) and whether it asks
    for a ``snapshot``; for refresh, the new token."""

    type: MessageType
    topics: tuple[str, ...] = ()
    since: str | None = None
    snapshot: bool = False
    token: str | None = dataclasses.field(default=None, repr=False)


def parse_client_message(raw: str | bytes) -> ClientRequest:
    """Parse and validate one message from a client.

    Raises:
        ProtocolError: The message is not JSON, not an object, has a missing or unknown
            ``type``, or names invalid topics.
    """
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("message is not valid JSON", {"reason": str(exc)}) from None
    if not isinstance(message, dict):
        raise ProtocolError("message must be a JSON object", {"received": type(message).__name__})
    kind = message.get("type")
    if kind is None:
        raise ProtocolError('message has no "type"')
    if not isinstance(kind, str) or kind not in CLIENT_MESSAGE_TYPES:
        raise ProtocolError(
            "unknown message type",
            {"type": kind, "expected": sorted(CLIENT_MESSAGE_TYPES)},
        )
    request_type = MessageType(kind)
    data = message.get("data")
    if request_type is MessageType.REFRESH:
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            # The value is a credential: the error never echoes it.
            raise ProtocolError('refresh needs "data": {"token": "<a subscriber token>"}')
        return ClientRequest(request_type, token=token)
    if request_type not in (MessageType.SUBSCRIBE, MessageType.UNSUBSCRIBE):
        return ClientRequest(request_type)
    if not isinstance(data, dict) or "topics" not in data:
        raise ProtocolError(f'{kind} needs "data": {{"topics": [...]}}')
    topics = parse_topics(data["topics"])
    since = None
    if request_type is MessageType.SUBSCRIBE and "since" in data:
        since = data["since"]
        parse_message_id(since)
    snapshot = False
    if request_type is MessageType.SUBSCRIBE and "snapshot" in data:
        snapshot = data["snapshot"]
        if not isinstance(snapshot, bool):
            raise ProtocolError('"snapshot" must be true or false', {"snapshot": shown(snapshot)})
    return ClientRequest(request_type, topics, since, snapshot)


def topic_problem(topic: object) -> str | None:
    """What is wrong with ``topic`` as a topic name; None when it is a valid one.

    The one topic rule: a string of 1 to :data:`MAX_TOPIC_LENGTH` characters. Subscriptions,
    publishes, ``default_topics`` and the HTTP API all apply it, so that a topic one of them
    accepts can match in the others.
    """
    if not isinstance(topic, str):
        return "topic must be a string"
    if not topic:
        return "topic must not be empty"
    if len(topic) > MAX_TOPIC_LENGTH:
        return f"topic is longer than {MAX_TOPIC_LENGTH} characters"
    return None


def parse_topics(topics: Any) -> tuple[str, ...]:
    """Validate a list of topic names, keeping the first of any repeats.

    Raises:
        ProtocolError: ``topics`` is not a list, or one entry is not a string of 1 to 256
            characters.
    """
    if not isinstance(topics, list):
        raise ProtocolError("topics must be a list of strings", {"topics": topics})
    for topic in topics:
        problem = topic_problem(topic)
        if problem is None:
            continue
        if isinstance(topic, str) and topic:
            raise ProtocolError(problem, {"topic": topic[:64] + "...", "length": len(topic)})
        raise ProtocolError(problem, {"topic": topic})
    return tuple(dict.fromkeys(topics))


def topic_list(topics: Iterable[str] | str) -> list[str]:
    """The topic list of a publish: one topic or an iterable of them, each checked.

    Raises:
        TypeError: A topic is not a string.
        ValueError: A topic is empty or longer than :data:`MAX_TOPIC_LENGTH`.
    """
    topic_list = [topics] if isinstance(topics, str) else list(topics)
    for topic in topic_list:
        problem = topic_problem(topic)
        if problem is not None:
            error = TypeError if not isinstance(topic, str) else ValueError
            shown = topic[:64] if isinstance(topic, str) else topic
            raise error(f"{problem}, got {shown!r}")
    return topic_list


def check_message_type(message_type: object) -> None:
    """Refuse a type nobody may publish: not a non-empty string, or one the protocol uses.

    Raises:
        TypeError: ``message_type`` is not a non-empty string.
        ValueError: ``message_type`` is in :data:`PROTOCOL_TYPES`.
    """
    if not isinstance(message_type, str) or not message_type:
        raise TypeError(f"message_type must be a non-empty string, got {message_type!r}")
    if message_type in PROTOCOL_TYPES:
        raise ValueError(
            f"message_type {message_type!r} is reserved for the protocol; "
            "publish events under types of their own"
        )


def check_message_key(key: object) -> str:
    """``key`` if it is a usable conflation key: the topic rule, a string of 1 to
    :data:`MAX_TOPIC_LENGTH` characters (it names a thing, such as ``run:42``).

    Raises:
        TypeError: ``key`` is not a string.
        ValueError: ``key`` is empty or too long.
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a string, got {type(key).__name__}")
    if not key or len(key) > MAX_TOPIC_LENGTH:
        raise ValueError(f"key must be 1 to {MAX_TOPIC_LENGTH} characters, got {len(key)}")
    return key


# Twenty digits hold any 64-bit value; the bound keeps int() of hostile input cheap.
_MESSAGE_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def parse_message_id(message_id: object) -> tuple[int, int]:
    """Split a message id ``"<milliseconds>-<sequence>"`` into the integer pair it compares as.

    Raises:
        ProtocolError: ``message_id`` is not a string of that form.
    """
    match = _MESSAGE_ID.fullmatch(message_id) if isinstance(message_id, str) else None
    if match is None:
        shown = message_id[:64] if isinstance(message_id, str) else message_id
        raise ProtocolError(
            'since must be a message id "<milliseconds>-<sequence>"', {"since": shown}
        )
    return int(match[1]), int(match[2])


def rfc3339(epoch_ns: int) -> str:
    """Format nanoseconds since the epoch as RFC 3339 UTC with milliseconds and a ``Z``."""
    seconds, remainder = divmod(epoch_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (
        f".{remainder // 1_000_000:03d}Z"
    )


class MessageClock:
    """Hands out the ``id`` and ``timestamp`` of each published message.

    An id is ``"<milliseconds>-<sequence>"``, like a Redis stream entry id: the time of the
    publish in milliseconds since the epoch and a counter within that millisecond. Ids compare
    as integer pairs and increase strictly in publish order, even when the wall clock steps
    back, and a restarted hub does not reuse the ids of an earlier one unless the clock went
    back further than its last id.
    """

    __slots__ = ("_last_ms", "_sequence", "_timestamp")

    def __init__(self) -> None:
        self._last_ms = 0
        self._sequence = 0
        self._timestamp = ""

    def next(self) -> tuple[str, str]:
        """Return ``(id, timestamp)`` for the next published message."""
        now_ns = time.time_ns()
        now_ms = now_ns // 1_000_000
        if now_ms > self._last_ms:
            self._last_ms = now_ms
            self._sequence = 0
            self._timestamp = rfc3339(now_ns)
        else:
            self._sequence += 1
        return f"{self._last_ms}-{self._sequence}", self._timestamp

    @property
    def last_id(self) -> str:
        """The id :meth:`next` handed out last; ``"0-0"``, older than any, before the first."""
        return f"{self._last_ms}-{self._sequence}"

    @staticmethod
    def now() -> str:
        """The current time for messages that carry no id."""
        return rfc3339(time.time_ns())
