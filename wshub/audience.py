"""Who watches what, on one hub and on every hub joined with it.

A runner publishes fine-grained progress only while someone watches (``GET /api/topics``,
``Publisher.watchers``). With hubs joined over a backplane, the one it asks holds only its
own clients, so each hub shares its :class:`Audience` through the backplane every
:data:`SHARE_EVERY` seconds, kept :data:`SHARED_FOR` seconds (a hub that stopped drops out),
and :func:`total` adds them up by the rule of a message's reach: a client that holds a
topic and ``"*"`` is one watcher, and a hub where nobody holds the topic still counts its
``"*"`` clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple

import orjson

__all__ = ["SHARED_FOR", "SHARE_EVERY", "Audience", "total"]

#: Seconds between two reports of a hub's audience to the backplane.
SHARE_EVERY: Final = 1.0
#: Seconds a report counts: a hub that stopped reporting drops out after this.
SHARED_FOR: Final = 3.0


class Audience(NamedTuple):
    """The clients of one hub (or of several, added up) by topic.

    Attributes:
        wildcard: Clients holding ``"*"``: the watchers of any topic.
        topics: For each other topic some client holds: how many hold it (subscribers) and
            how many a message to it reaches (watchers: those, and the ``"*"`` clients).
        hubs: How many hubs' clients are counted.
    """

    wildcard: int
    topics: Mapping[str, tuple[int, int]]
    hubs: int = 1

    def subscribers(self, topic: str) -> int:
        """Clients holding ``topic`` itself."""
        if topic == "*":
            return self.wildcard
        held = self.topics.get(topic)
        return held[0] if held is not None else 0

    def watchers(self, topic: str) -> int:
        """Clients a message to ``topic`` reaches: holding it or ``"*"``, each once."""
        if topic == "*":
            return self.wildcard
        held = self.topics.get(topic)
        return held[1] if held is not None else self.wildcard

    def by_topic(self) -> dict[str, dict[str, int]]:
        """Every topic held, ``"*"`` included: ``{"subscribers", "watchers"}``, sorted."""
        names = sorted({*self.topics, *(("*",) if self.wildcard else ())})
        return {
            name: {"subscribers": self.subscribers(name), "watchers": self.watchers(name)}
            for name in names
        }

    def encode(self) -> bytes:
        """As a hub shares it through the backplane."""
        return orjson.dumps({"wildcard": self.wildcard, "topics": self.topics})

    @classmethod
    def decode(cls, report: bytes) -> Audience:
        """A report another hub shared.

        Raises:
            ValueError: It is not one (JSON errors are ValueErrors).
        """
        fields: Any = orjson.loads(report)
        topics = fields["topics"]
        if not isinstance(fields["wildcard"], int) or not isinstance(topics, dict):
            raise ValueError("not an audience report")
        return cls(
            fields["wildcard"], {str(name): (int(s), int(w)) for name, (s, w) in topics.items()}
        )


def total(audiences: Iterable[Audience]) -> Audience:
    """Several hubs' audiences added up."""
    audiences = list(audiences)
    names = {name for audience in audiences for name in audience.topics}
    topics = {
        name: (
            sum(audience.subscribers(name) for audience in audiences),
            sum(audience.watchers(name) for audience in audiences),
        )
        for name in names
    }
    return Audience(
        sum(audience.wildcard for audience in audiences),
        topics,
        sum(audience.hubs for audience in audiences),
    )
