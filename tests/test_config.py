"""HubConfig: the seed defaults, and a clear error naming the field for every bad value."""

from __future__ import annotations

from typing import Any

import pytest

from wshub import HubConfig


def test_defaults_are_the_seed_defaults() -> None:
    config = HubConfig()
    assert (
        config.max_clients,
        config.write_timeout,
        config.read_timeout,
        config.ping_interval,
        config.pong_timeout,
        config.max_message_size,
        config.client_buffer_size,
        config.broadcast_buffer_size,
        config.enable_ping_pong,
        config.disconnect_on_error,
        config.log_connection_events,
    ) == (100, 10.0, 60.0, 54.0, 60.0, 524288, 256, 1000, True, True, True)
    # The seed's was "disconnect": a dashboard that falls behind now catches up on the latest
    # of every key instead, and is still closed before it loses an event.
    assert config.slow_client_policy == "conflate"
    assert config.default_topics == ("*",)
    assert config.max_subscriptions == 100
    assert config.allowed_origins is None
    assert config.flush_interval == 0.0
    assert (config.history_size, config.history_ttl) == (1000, 300.0)
    assert HubConfig(history_size=0, history_ttl=0).history_size == 0  # 0 disables
    assert (
        config.snapshot_window,
        config.snapshot_window_ttl,
        config.snapshot_key_ttl,
        config.snapshot_max_keys,
    ) == (100, 3600.0, 3600.0, 10_000)
    assert HubConfig(snapshot_window=0, snapshot_key_ttl=0).snapshot_window == 0  # 0: none
    # Measured: 45% fewer bytes on the wire at the same CPU per delivered message (README).
    assert (config.compression, config.compression_min_size) == ("deflate", 128)
    assert HubConfig(compression="off", compression_min_size=0).compression == "off"


BAD_VALUES: list[tuple[str, Any]] = [
    ("max_clients", 0),
    ("max_clients", 1.5),
    ("max_clients", True),
    ("write_timeout", 0),
    ("read_timeout", -1),
    ("ping_interval", float("nan")),
    ("pong_timeout", "60"),
    ("max_message_size", -5),
    ("client_buffer_size", 0),
    ("broadcast_buffer_size", None),
    ("max_buffered_bytes", 0),
    ("max_subscriptions", 0),
    ("flush_interval", -0.1),
    ("flush_interval", float("inf")),
    ("enable_ping_pong", "yes"),
    ("disconnect_on_error", 1),
    ("log_connection_events", None),
    ("slow_client_policy", "ignore"),
    ("default_topics", "*"),
    ("default_topics", [""]),
    ("default_topics", [7]),
    ("default_topics", ["t" * 257]),
    ("allowed_origins", "https://a.example"),
    ("allowed_origins", [None]),
    ("history_size", -1),
    ("history_size", 2.5),
    ("history_size", True),
    ("history_ttl", -1),
    ("history_ttl", float("nan")),
    ("history_ttl", "300"),
    ("compression", "gzip"),
    ("compression", True),
    ("compression_min_size", -1),
    ("compression_min_size", 1.5),
    ("snapshot_window", -1),
    ("snapshot_window", 1.5),
    ("snapshot_window_ttl", -1),
    ("snapshot_window_ttl", float("inf")),
    ("snapshot_key_ttl", -0.5),
    ("snapshot_key_ttl", "3600"),
    ("snapshot_max_keys", 0),
    ("snapshot_max_keys", True),
    ("open_timeout", 0),
    ("max_pending_handshakes", 0),
    ("max_publish_size", 0),
    ("client_message_rate", -1),
    ("client_message_rate", float("inf")),
    ("client_message_burst", 0),
    ("client_message_burst", 2.5),
    ("socket_send_buffer", -1),
    ("file_descriptor_reserve", -1),
    ("max_connections_per_ip", -1),
    ("trusted_proxies", "10.0.0.1"),
    ("trusted_proxies", ["not-an-address"]),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        HubConfig(**{field: value})


def test_default_topics_must_fit_max_subscriptions() -> None:
    with pytest.raises(ValueError, match=r"^default_topics .*max_subscriptions"):
        HubConfig(default_topics=("a", "b"), max_subscriptions=1)


def test_lists_become_tuples() -> None:
    config = HubConfig(default_topics=["a", "b"], allowed_origins=["https://a.example"])
    assert config.default_topics == ("a", "b")
    assert config.allowed_origins == ("https://a.example",)
