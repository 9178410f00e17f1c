"""Settings of a standalone hub: file, environment and flags, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from wshub.settings import ServerSettings, SettingsError, load_settings, setting_kinds

from .helpers import SECRET


def test_defaults() -> None:
    settings = load_settings({}, environ={})
    assert settings == ServerSettings()
    assert (settings.port, settings.api_host, settings.api_port) == (8080, "127.0.0.1", 8081)
    assert settings.hub.max_clients == 100


def test_flags_beat_environment_which_beats_the_file(tmp_path: Path) -> None:
    config = tmp_path / "wshub.toml"
    config.write_text(
        'port = 9000\nmax_clients = 10\nallowed_origins = ["https://a.example"]\n'
        "enable_ping_pong = false\nflush_interval = 0.5\n"
    )
    settings = load_settings(
        {"max_clients": "30", "port": None},
        config_file=config,
        environ={"WSHUB_MAX_CLIENTS": "20", "WSHUB_DEFAULT_TOPICS": "a, b", "OTHER": "x"},
    )
    assert settings.port == 9000
    assert settings.hub.max_clients == 30
    assert settings.hub.default_topics == ("a", "b")
    assert settings.hub.allowed_origins == ("https://a.example",)
    assert settings.hub.enable_ping_pong is False
    assert settings.hub.flush_interval == 0.5


def test_every_hub_field_has_a_setting() -> None:
    kinds = setting_kinds()
    assert kinds["max_clients"] == "int"
    assert kinds["allowed_origins"] == "list?"
    assert kinds["enable_ping_pong"] == "bool"
    assert kinds["certfile"] == "str?"
    assert {"write_timeout", "slow_client_policy", "flush_interval", "api_port"} <= set(kinds)


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ({"max_clients": "zero"}, {}, r"^max_clients \(from --max-clients\): expected a whole"),
        ({}, {"WSHUB_PORT": "70000"}, r"^port must be a TCP port .* \(from WSHUB_PORT\)"),
        ({}, {"WSHUB_MAX_CLIENTS": "0"}, r"^max_clients must be a positive .*WSHUB_MAX_CLIENTS"),
        ({"enable_ping_pong": "maybe"}, {}, r"^enable_ping_pong \(from --enable-ping-pong\)"),
        ({"write_timeout": "soon"}, {}, r"^write_timeout .*expected a number"),
        ({"slow_client_policy": "ignore"}, {}, r"^slow_client_policy must be one of"),
        ({"certfile": "cert.pem"}, {}, r"certfile and keyfile must be given together"),
        ({"log_format": "xml"}, {}, r"^log_format must be text or json"),
        ({"compression": "gzip"}, {}, r"^compression must be one of off, deflate"),
        ({}, {"WSHUB_EVENTS_PATH": "events"}, r"^events_path must start with '/'.*EVENTS_PATH"),
        ({"events_path": "/api/ws"}, {}, r"^events_path and path are both '/api/ws'"),
        ({"workers": "0"}, {}, r"^workers must be a positive integer, got 0 \(from --workers\)"),
        ({}, {"WSHUB_WORKERS": "two"}, r"^workers \(from WSHUB_WORKERS\): expected a whole"),
        ({}, {"WSHUB_WORKERS": "2"}, r"^workers must be 1 unless redis_url is set .*WSHUB_WORK"),
    ],
)
def test_bad_values_name_the_setting_and_its_source(
    flags: dict[str, str], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(SettingsError, match=expected):
        load_settings(flags, environ=environ)


def test_bad_config_files_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "wshub.toml"
    config.write_text("max_clientz = 5\n")
    with pytest.raises(SettingsError, match="unknown setting max_clientz"):
        load_settings({}, config_file=config, environ={})
    config.write_text("max_clients = 'many'\n")
    with pytest.raises(SettingsError, match=r"^max_clients \(from .*wshub.toml\)"):
        load_settings({}, config_file=config, environ={})
    config.write_text("max_clients = \n")
    with pytest.raises(SettingsError, match="config file"):
        load_settings({}, config_file=config, environ={})


def test_workers_from_every_source(tmp_path: Path) -> None:
    assert load_settings({}, environ={}).workers == 1
    config = tmp_path / "wshub.toml"
    config.write_text('workers = 3\nredis_url = "redis://127.0.0.1:6379/0"\n')
    assert load_settings({}, config_file=config, environ={}).workers == 3
    from_environment = load_settings({}, config_file=config, environ={"WSHUB_WORKERS": "4"})
    assert from_environment.workers == 4
    flags = {"workers": "2", "redis_url": "redis://127.0.0.1:6379/0"}
    assert load_settings(flags, environ={}).workers == 2


def test_the_publish_token_from_a_file_or_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    from_file = load_settings({"publish_token_file": str(token_file)}, environ={})
    assert from_file.publish_token == "s3cret"
    from_environment = load_settings({}, environ={"WSHUB_PUBLISH_TOKEN": "t0ken"})
    assert from_environment.publish_token == "t0ken"


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        (
            {"publish_token_file": "{missing}"},
            {},
            "publish_token_file cannot be read: {missing}",
        ),
        ({"publish_token_file": "{empty}"}, {}, "publish_token_file {empty} is empty"),
        (
            {"publish_token_file": "{empty}"},
            {"WSHUB_PUBLISH_TOKEN": "x"},
            "publish_token_file and publish_token are both set",
        ),
        ({"api_host": "0.0.0.0"}, {}, "publish_token must be set when api_host"),
        (
            {"auth_secret_file": "{missing}"},
            {},
            "auth_secret_file cannot be read: {missing}",
        ),
        (
            {"auth_secret_file": "{empty}"},
            {"WSHUB_AUTH_SECRET": "x" * 32},
            "auth_secret_file and auth_secret are both set",
        ),
        ({"auth_required": "true"}, {}, "auth_required is true but no key verifies tokens"),
        (
            {"auth_secret_file": "{short}"},
            {},
            "auth_secret must be at least 32 bytes",
        ),
        ({"api_host": "api.internal"}, {}, "publish_token must be set when api_host"),
    ],
)
def test_token_mistakes_fail_at_start(
    tmp_path: Path, flags: dict[str, str], environ: dict[str, str], expected: str
) -> None:
    (tmp_path / "empty").write_text(" \n")
    (tmp_path / "short").write_text("too short\n")
    paths = {name: str(tmp_path / name) for name in ("missing", "empty", "short")}
    flags = {name: value.format(**paths) for name, value in flags.items()}
    with pytest.raises(SettingsError) as error:
        load_settings(flags, environ=environ)
    assert str(error.value).startswith(expected.format(**paths))


def test_the_auth_secret_from_a_file_or_the_environment(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    flags = {"auth_secret_file": str(secret_file), "auth_required": "yes"}
    from_file = load_settings(flags, environ={})
    assert (from_file.hub.auth_secret, from_file.hub.auth_required) == (SECRET, True)
    assert SECRET not in repr(from_file)  # settings are logged and printed: never the secret
    from_environment = load_settings({}, environ={"WSHUB_AUTH_SECRET": SECRET})
    assert from_environment.hub.auth_secret == SECRET


def test_the_api_may_listen_beyond_loopback_with_a_token() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert load_settings({"api_host": host}, environ={}).api_host == host
    settings = load_settings({"api_host": "0.0.0.0", "publish_token": "x"}, environ={})
    assert settings.api_host == "0.0.0.0"
