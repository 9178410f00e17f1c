"""Settings of a standalone hub: every HubConfig field plus the server's own, from a TOML file,
``WSHUB_*`` environment variables and command-line flags, in rising order of precedence.

A value that does not parse or does not validate stops start-up with a :class:`SettingsError`
that names the setting and where the value came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import HubConfig

__all__ = [
    "HUB_FIELDS",
    "SERVER_FIELDS",
    "ServerSettings",
    "SettingsError",
    "is_loopback",
    "load_settings",
    "setting_kinds",
]

ENV_PREFIX = "WSHUB_"
EXPECTED = {"int": "a whole number", "float": "a number", "bool": "true or false"}


class SettingsError(ValueError):
    """A setting's value is wrong; the message names the setting and its source."""


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """A standalone hub: where it listens and how, and the :class:`HubConfig` it runs.

    Attributes:
        host: Interface of the public WebSocket port.
        port: The public WebSocket port (0 picks a free one).
        path: The WebSocket endpoint.
        events_path: The Server-Sent Events stream of the same messages
            (docs/protocol.md); empty serves none.
        api_host: Interface of the internal HTTP API; keep it private.
        api_port: The internal HTTP API port (0 picks a free one).
        certfile: TLS certificate (PEM) for ``wss://``; with ``keyfile``.
        keyfile: TLS private key (PEM).
        publish_token: Bearer token the internal API requires, when set. Required when
            ``api_host`` is not a loopback address. Prefer ``publish_token_file`` or
            ``WSHUB_PUBLISH_TOKEN``: a command line is readable by every user of the machine.
        publish_token_file: A file holding the publish token (surrounding whitespace is
            dropped); instead of ``publish_token``.
        auth_secret_file: A file holding the HS256 secret of subscriber tokens (surrounding
            whitespace is dropped); instead of ``hub.auth_secret``, which a command line
            would show to every user of the machine (``WSHUB_AUTH_SECRET`` works too).
        api_allowed_origins: Browser origins whose pages may POST to the internal API; a
            POST from any other page is refused (403).
        log_format: ``"text"`` for people, ``"json"`` for machines.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        workers: Processes serving the same ports (``SO_REUSEPORT``, Linux); more than 1
            needs ``hub.redis_url``, or each would see only its own publishes.
        hub: The hub's configuration.
    """

    host: str = "0.0.0.0"
    port: int = 8080
    path: str = "/api/ws"
    events_path: str = "/api/events"
    api_host: str = "127.0.0.1"
    api_port: int = 8081
    certfile: str | None = None
    keyfile: str | None = None
    publish_token: str | None = None
    publish_token_file: str | None = None
    auth_secret_file: str | None = None
    api_allowed_origins: Sequence[str] = ()
    log_format: str = "text"
    log_level: str = "info"
    workers: int = 1
    hub: HubConfig = dataclasses.field(default_factory=HubConfig)

    def __post_init__(self) -> None:
        for name in ("port", "api_port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise SettingsError(f"{name} must be a TCP port from 0 to 65535, got {value!r}")
        if not self.path.startswith("/"):
            raise SettingsError(f"path must start with '/', got {self.path!r}")
        if self.events_path and not self.events_path.startswith("/"):
            raise SettingsError(
                f"events_path must start with '/' (or be empty: no stream), "
                f"got {self.events_path!r}"
            )
        if self.events_path == self.path:
            raise SettingsError(f"events_path and path are both {self.path!r}")
        if (self.certfile is None) != (self.keyfile is None):
            raise SettingsError("certfile and keyfile must be given together")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"log_format must be text or json, got {self.log_format!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError(
                f"log_level must be debug, info, warning or error, got {self.log_level!r}"
            )
        if self.publish_token is not None and not self.publish_token:
            raise SettingsError("publish_token must not be empty")
        if self.publish_token is None and not is_loopback(self.api_host):
            # Anyone who reaches the API could publish to every dashboard.
            raise SettingsError(
                f"publish_token must be set when api_host is not a loopback address "
                f"(api_host is {self.api_host!r}); set publish_token_file or "
                f"WSHUB_PUBLISH_TOKEN"
            )
        hub = self.hub
        if hub.auth_required and not (hub.auth_secret or hub.auth_public_key or hub.auth_jwks_url):
            # Embedded, an authenticate hook may decide; a standalone hub has only keys.
            raise SettingsError(
                "auth_required is true but no key verifies tokens: set auth_secret_file "
                "(or WSHUB_AUTH_SECRET), auth_public_key or auth_jwks_url"
            )
        if isinstance(self.api_allowed_origins, str) or not all(
            isinstance(origin, str) for origin in self.api_allowed_origins
        ):
            raise SettingsError(
                f"api_allowed_origins must be a list of origins, got {self.api_allowed_origins!r}"
            )
        object.__setattr__(self, "api_allowed_origins", tuple(self.api_allowed_origins))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise SettingsError(f"workers must be a positive integer, got {self.workers!r}")
        if self.workers > 1 and self.hub.redis_url is None:
            # Each worker is a hub of its own: without a backplane, a publish through the
            # API reaches only the clients of the worker that happened to take the request.
            raise SettingsError(
                f"workers must be 1 unless redis_url is set (each worker would see only the "
                f"messages published through it), got {self.workers}"
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


# Secrets read from a file rather than given where other users can see them: the file's
# setting, and the setting its content becomes.
SECRET_FILES = {"publish_token_file": "publish_token", "auth_secret_file": "auth_secret"}


def _read_secret_file(setting: str, path: str, source: str) -> str:
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{setting} cannot be read: {path}: {exc} (from {source})") from None
    if not secret:
        raise SettingsError(f"{setting} {path} is empty (from {source})")
    return secret


SERVER_FIELDS = tuple(
    field.name for field in dataclasses.fields(ServerSettings) if field.name != "hub"
)
HUB_FIELDS = tuple(field.name for field in dataclasses.fields(HubConfig))


def setting_kinds() -> dict[str, str]:
    """Every setting's name and kind: ``int``, ``float``, ``bool``, ``str``, ``list`` (of
    strings), each ``?`` when it may be unset."""
    kinds = {}
    for owner in (ServerSettings, HubConfig):
        for field in dataclasses.fields(owner):
            if field.name == "hub":
                continue
            annotation = str(field.type)
            optional = "None" in annotation
            base = annotation.replace("| None", "").strip()
            kind = "list" if "Sequence" in base or "tuple" in base else base
            kinds[field.name] = kind + ("?" if optional else "")
    return kinds


def _number(kind: type[int] | type[float], value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError from None  # the caller says what was expected


def _convert(name: str, kind: str, value: Any, source: str) -> Any:
    """Turn a TOML value, or the text of a flag or environment variable, into ``kind``."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    text = isinstance(value, str)
    if optional and (value is None or (text and value.strip().lower() in ("", "none"))):
        return None
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if text and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if text and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(value, bool) or not (isinstance(value, int) or text):
                raise ValueError
            return _number(int, value)
        if kind == "float":
            if isinstance(value, bool) or not (isinstance(value, int | float) or text):
                raise ValueError
            return _number(float, value)
        if kind == "list":
            if text:
                return tuple(item.strip() for item in value.split(",") if item.strip())
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                return tuple(value)
            raise ValueError("expected a list of strings")
        if not text:
            raise ValueError("expected a string")
        return value
    except ValueError as exc:
        expected = str(exc) or f"expected {EXPECTED[kind]}"
        raise SettingsError(f"{name} (from {source}): {expected}, got {value!r}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """The settings in a TOML file: top-level keys named like the settings.

    Raises:
        SettingsError: The file cannot be read or parsed, or names an unknown setting.
    """
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    kinds = setting_kinds()
    unknown = sorted(set(document) - set(kinds))
    if unknown:
        raise SettingsError(f"config file {path}: unknown setting {', '.join(unknown)}")
    return {
        name: _convert(name, kinds[name], value, f"{path}") for name, value in document.items()
    }


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings in ``WSHUB_<NAME>`` variables (``WSHUB_MAX_CLIENTS=10000``)."""
    values = {}
    for name, kind in setting_kinds().items():
        variable = ENV_PREFIX + name.upper()
        if variable in environ:
            values[name] = _convert(name, kind, environ[variable], variable)
    return values


def load_settings(
    flags: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerSettings:
    """Merge defaults, the TOML file, the environment and ``flags`` (text values, or None for
    flags not given), later sources winning, and validate the result.

    Raises:
        SettingsError: A value is malformed or invalid; the message names the setting.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        merged.update(read_toml(config_file))
        sources.update(dict.fromkeys(merged, str(config_file)))
    from_environment = read_environment(environ)
    merged.update(from_environment)
    sources.update({name: ENV_PREFIX + name.upper() for name in from_environment})
    kinds = setting_kinds()
    for name, value in flags.items():
        if value is not None:
            flag = "--" + name.replace("_", "-")
            merged[name] = _convert(name, kinds[name], value, flag)
            sources[name] = flag
    for file_setting, setting in SECRET_FILES.items():
        path = merged.get(file_setting)
        if path is None:
            continue
        if merged.get(setting) is not None:
            raise SettingsError(
                f"{file_setting} and {setting} are both set "
                f"(from {sources[file_setting]} and {sources[setting]}); set one"
            )
        merged[setting] = _read_secret_file(file_setting, path, sources[file_setting])
        sources[setting] = sources[file_setting]
    hub_values = {name: merged.pop(name) for name in list(merged) if name in HUB_FIELDS}
    try:
        hub = HubConfig(**hub_values)
        return ServerSettings(**merged, hub=hub)
    except ValueError as exc:  # the messages start with the setting's name
        message = str(exc)
        name = message.split(" ", 1)[0]
        if name in sources:
            message += f" (from {sources[name]})"
        raise SettingsError(message) from None
