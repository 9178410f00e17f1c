"""What a round publishes: batches of events, each batch in one event-loop iteration."""

from __future__ import annotations

from typing import Any

from .servers import event_data

__all__ = ["Batch", "expected_messages", "schedule", "topic_of_client", "topic_of_message"]

Batch = list[tuple[dict[str, Any], str | None]]


def topic_of_message(index: int, topics: int) -> str | None:
    """Message ``index`` goes to one topic of ``topics``, or to everyone when 0."""
    return f"t{index % topics}" if topics else None


def topic_of_client(index: int, topics: int) -> str | None:
    """Client ``index`` follows one topic of ``topics``, or gets everything when 0."""
    return f"t{index % topics}" if topics else None


def shape(plan: Any, workload: str, clients: int) -> tuple[int, int]:
    """``(messages, per_batch)`` of a round with ``clients`` clients."""
    if workload == "burst":
        bursts = plan.bursts or max(1, plan.deliveries // (plan.burst * clients))
        return bursts * plan.burst, plan.burst
    if plan.rate > 0:
        return max(1, int(plan.rate * plan.duration)), 1
    return plan.stream_messages or max(10, plan.deliveries // clients), 1


def schedule(plan: Any, workload: str, clients: int) -> list[Batch]:
    """The round's events, in batches."""
    count, per_batch = shape(plan, workload, clients)
    events = [
        (event_data(index, plan.size), topic_of_message(index, plan.topics))
        for index in range(count)
    ]
    return [events[start : start + per_batch] for start in range(0, count, per_batch)]


def expected_messages(
    plan: Any, workload: str, clients: int, topics: list[str | None], slow: list[bool]
) -> int:
    """How many messages the reading clients among ``topics``/``slow`` should receive."""
    count, _ = shape(plan, workload, clients)
    per_topic: dict[str | None, int] = {}
    for index in range(count):
        topic = topic_of_message(index, plan.topics)
        per_topic[topic] = per_topic.get(topic, 0) + 1
    everyone = per_topic.get(None, 0)
    return sum(
        everyone + (per_topic.get(topic, 0) if topic is not None else 0)
        for topic, is_slow in zip(topics, slow, strict=True)
        if not is_slow
    )
