"""Prometheus metrics of a hub: its counters read at scrape time, and the latency buckets.

:class:`HubCollector` turns :meth:`Hub.stats <wshub.Hub.stats>` into gauges and counters on
each scrape. :data:`LATENCY_BUCKETS` are the buckets of the API's
``wshub_api_publish_to_flush_seconds`` histogram, which :mod:`wshub.api` owns because it
times HTTP publishes. Both are re-exported by :mod:`wshub.api`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._version import __version__
from .hub import Hub

__all__ = ["LATENCY_BUCKETS", "MAX_TOPIC_SERIES", "HubCollector"]

#: Buckets of ``wshub_api_publish_to_flush_seconds``, in seconds. With the default
#: ``flush_interval`` of 0 the flush follows within one loop iteration (tens of µs to a few
#: ms), so the buckets start far below prometheus_client's default 5 ms.
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

# stats() key -> (metric name without the _total suffix, help text).
#: The most topics ``wshub_topic_subscribers`` has a series for (a label per topic).
MAX_TOPIC_SERIES: Final = 100

_COUNTERS: Final = (
    ("messages_published", "wshub_messages_published", "Messages published through the hub."),
    (
        "deliveries",
        "wshub_deliveries",
        "Messages queued for a client (one publish to N clients counts N; direct replies "
        "such as the connection greeting count too).",
    ),
    (
        "drops",
        "wshub_drops",
        "Messages dropped for slow or closing clients instead of being written.",
    ),
    (
        "conflated",
        "wshub_conflated",
        "Queued messages superseded by a newer one with the same key for clients that fell "
        "behind (slow_client_policy conflate).",
    ),
    ("bytes_sent", "wshub_bytes_sent", "Bytes written to client transports by the hub."),
    ("writes", "wshub_writes", "Transport writes made by the fan-out core."),
    (
        "messages_compressed",
        "wshub_messages_compressed",
        "Messages compressed for clients that negotiated permessage-deflate, once each "
        "whatever the number of recipients.",
    ),
    (
        "slow_consumer_disconnects",
        "wshub_slow_consumer_disconnects",
        "Clients closed with 4008 as slow consumers.",
    ),
    (
        "protocol_errors",
        "wshub_protocol_errors",
        "Invalid client messages answered with an error envelope.",
    ),
    (
        "rate_limited",
        "wshub_rate_limited",
        "Client messages and control frames refused over client_message_rate.",
    ),
    (
        "publish_failures",
        "wshub_publish_failures",
        "Publishes the backplane could not take (Redis unreachable); 0 without a backplane.",
    ),
    (
        "rejected_connections",
        "wshub_rejected_connections",
        "Clients closed at registration because the hub was full.",
    ),
)


class HubCollector(Collector):
    """Prometheus collector that reads a hub's counters at scrape time.

    Reading :meth:`Hub.stats` on each scrape keeps the hub free of metric bookkeeping: the
    hub already counts everything, and a scrape costs one ``stats()`` call.

    Args:
        hub: The hub to describe.
    """

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples, so a registry can spot name clashes.

        Returns:
            An iterator over empty metric families.
        """
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        """The hub's current gauges and counters.

        Returns:
            An iterator over metric families with one sample each.
        """
        yield from self._families(self._hub.stats())

    def _families(self, stats: Mapping[str, Any] | None) -> Iterator[Metric]:
        hub = self._hub
        info = InfoMetricFamily("wshub", "The hub's version and fan-out core.")
        clients = GaugeMetricFamily(
            "wshub_clients_connected", "Clients connected (WebSocket and event streams)."
        )
        running = GaugeMetricFamily(
            "wshub_hub_running", "1 while the hub accepts clients and messages, else 0."
        )
        if stats is not None:
            info.add_metric([], {"version": __version__, "implementation": hub.implementation})
            clients.add_metric([], stats["clients"])
            running.add_metric([], 1 if hub.running else 0)
        retained_keys = GaugeMetricFamily(
            "wshub_retained_keys", "Keys whose latest message is retained for snapshots."
        )
        retained_events = GaugeMetricFamily(
            "wshub_retained_events", "Messages without a key retained for snapshots."
        )
        compressed = GaugeMetricFamily(
            "wshub_compressed_clients", "Clients sent the shared compressed frames."
        )
        if stats is not None:
            retained_keys.add_metric([], stats["retained_keys"])
            retained_events.add_metric([], stats["retained_events"])
            compressed.add_metric([], stats["compressed_clients"])
        yield info
        yield clients
        yield running
        yield retained_keys
        yield retained_events
        yield compressed
        for key, name, documentation in _COUNTERS:
            counter = CounterMetricFamily(name, documentation)
            if stats is not None:
                counter.add_metric([], stats[key])
            yield counter
        refused = CounterMetricFamily(
            "wshub_refused_handshakes",
            "Handshakes the hub refused, by reason: stopping, origin, capacity, per_address, "
            "or why its credentials were refused (missing, expired, signature, ...).",
            labels=["reason"],
        )
        if stats is not None:
            for reason, count in sorted(stats["refused_handshakes"].items()):
                refused.add_metric([reason], count)
        yield refused
        yield from _topic_families(hub.topic_subscribers() if stats is not None else None)
        if hub.backplane is not None:
            yield from _backplane_families(stats["backplane"] if stats is not None else None)


def _topic_families(counts: Mapping[str, int] | None) -> Iterator[Metric]:
    topics = GaugeMetricFamily("wshub_topics", "Topics some client of this hub holds.")
    subscribers = GaugeMetricFamily(
        "wshub_topic_subscribers",
        f"Clients of this hub subscribed to each topic: the {MAX_TOPIC_SERIES} topics with "
        "the most, so that a hub of many runs keeps its series bounded.",
        labels=["topic"],
    )
    if counts is not None:
        topics.add_metric([], len(counts))
        busiest = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        for topic, count in busiest[:MAX_TOPIC_SERIES]:
            subscribers.add_metric([topic], count)
    yield topics
    yield subscribers


def _backplane_families(stats: Mapping[str, Any] | None) -> Iterator[Metric]:
    ready = GaugeMetricFamily(
        "wshub_backplane_ready", "1 while Redis answers and publishes are taken, else 0."
    )
    disconnects = CounterMetricFamily(
        "wshub_backplane_disconnects", "Times the hub found Redis unreachable."
    )
    reconnects = CounterMetricFamily(
        "wshub_backplane_reconnects", "Times the hub reached Redis again after losing it."
    )
    attempts = CounterMetricFamily(
        "wshub_backplane_reconnect_attempts",
        "Attempts to reach Redis again while it was unreachable (a few per outage, with backoff).",
    )
    missed = CounterMetricFamily(
        "wshub_backplane_missed",
        "Messages that left the Redis stream before the hub read them: its clients missed them.",
    )
    if stats is not None:
        ready.add_metric([], 1 if stats["ready"] else 0)
        disconnects.add_metric([], stats["disconnects"])
        reconnects.add_metric([], stats["reconnects"])
        attempts.add_metric([], stats["reconnect_attempts"])
        missed.add_metric([], stats["missed"])
    yield ready
    yield disconnects
    yield reconnects
    yield attempts
    yield missed
