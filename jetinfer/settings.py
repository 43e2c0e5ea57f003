"""Settings: keyword-only dataclasses, loaded from CLI flags and `JETINFER_*` environment variables.

Each process has one settings object. A field `max_wait_ms` is the flag `--max-wait-ms` and the
variable `JETINFER_MAX_WAIT_MS`; a flag wins over the variable, which wins over the default.
Validation runs at construction (`__post_init__`) and raises `SettingsError` naming the setting.

Fields are declared with `setting(default, "help text")`; list fields take several values after one
flag, a repeated flag, or a comma-separated variable (a field declared with `separator=None` keeps each
flag value whole and reads its variable as shell words: `--worker-arg=--max-wait-ms=2`).
`--help` shows each flag's variable and default (`default_text` where the value alone would not say it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from jetinfer.errors import SettingsError

__all__ = [
    "ENV_PREFIX",
    "ConnectionSettings",
    "StreamSettings",
    "add_arguments",
    "env_name",
    "flag_name",
    "load_settings",
    "require",
    "setting",
]

ENV_PREFIX = "JETINFER_"

T = TypeVar("T")


def setting(
    default: Any,
    help: str,
    *,
    secret: bool = False,
    default_text: str | None = None,
    separator: str | None = ",",
) -> Any:
    """Declare a settings field with its default and its `--help` text.

    `default_text` is what `--help` shows as the default (e.g. "the demo cache" for None); `separator`
    splits the values of a list field (None: flag values stay whole, the variable is split like a shell).
    """
    metadata = {"help": help, "secret": secret, "default_text": default_text, "separator": separator}
    if isinstance(default, list):
        frozen = list(default)
        return dataclasses.field(default_factory=lambda: list(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _shown_default(f: dataclasses.Field[Any]) -> str:
    """The default as `--help` shows it: never Python's `None`."""
    if f.metadata.get("default_text"):
        return str(f.metadata["default_text"])
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if f.metadata.get("secret") and default:
        return "***"
    if default is None:
        return "unset"
    if isinstance(default, list):
        return " ".join(str(v) for v in default) if default else "none"
    return str(default)


def flag_name(name: str) -> str:
    """`max_wait_ms` -> `--max-wait-ms`."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """`max_wait_ms` -> `JETINFER_MAX_WAIT_MS`."""
    return ENV_PREFIX + name.upper()


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(annotation: Any) -> tuple[Any, bool, bool]:
    """(scalar type, is_optional, is_list) of a field annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) != len(typing.get_args(annotation))
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is list:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def _convert(name: str, scalar: Any, text: str) -> Any:
    text = text.strip()
    try:
        if scalar is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {text!r}")
        if scalar is int:
            return int(text)
        if scalar is float:
            return float(text)
        if scalar is Path:
            return Path(text).expanduser()
        return text
    except ValueError as exc:
        raise SettingsError(
            name, f"cannot read {text!r} as {getattr(scalar, '__name__', scalar)}: {exc}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: frozenset[str] = frozenset()) -> None:
    """Add one flag per settings field to `parser` (defaults left to `load_settings`)."""
    hints = _field_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} (every flag is also a {ENV_PREFIX}* variable)")
    for f in fields(cls):
        if f.name in skip or not f.init:
            continue
        scalar, _optional, is_list = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "").replace("%", "%%")
        full_help = f"{help_text} [env {env_name(f.name)}; default: {_shown_default(f).replace('%', '%%')}]"
        if scalar is bool and not is_list:
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=full_help,
            )
        elif is_list:
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                action="extend",
                nargs="+",
                default=None,
                metavar="VALUE",
                help=full_help,
            )
        else:
            group.add_argument(
                flag_name(f.name), dest=f.name, default=None, metavar=f.name.upper(), help=full_help
            )


def load_settings(
    cls: Callable[..., T],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> T:
    """Build settings from overrides, then CLI args, then `JETINFER_*` variables, then defaults."""
    environ = os.environ if environ is None else environ
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    assert isinstance(cls, type)
    hints = _field_types(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        if not f.init:
            continue
        scalar, _optional, is_list = _base_type(hints[f.name])
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        separator = f.metadata.get("separator", ",")
        raw = given.get(f.name)
        if raw is not None:
            if is_list:
                items = [part for item in raw for part in _split(str(item), separator, flag=True)]
                values[f.name] = [_convert(f.name, scalar, item) for item in items]
            elif isinstance(raw, str):
                values[f.name] = _convert(f.name, scalar, raw)
            else:
                values[f.name] = raw
            continue
        env_value = environ.get(env_name(f.name))
        if env_value is not None and env_value != "":
            if is_list:
                parts = _split(env_value, separator, flag=False)
                values[f.name] = [_convert(f.name, scalar, p) for p in parts]
            else:
                values[f.name] = _convert(f.name, scalar, env_value)
    built: T = cls(**values)
    return built


def _split(text: str, separator: str | None, *, flag: bool) -> list[str]:
    """The items of a list value: split at `separator`; with None a flag value stays whole and a
    variable is split into shell words."""
    if separator is None:
        return [text] if flag else shlex.split(text)
    return [part for part in text.split(separator) if part.strip()]


def require(condition: bool, name: str, message: str) -> None:
    """Raise SettingsError(name, message) unless `condition` holds."""
    if not condition:
        raise SettingsError(name, message)


@dataclass(kw_only=True)
class ConnectionSettings:
    """How a process reaches NATS: the URL, credentials and TLS."""

    nats_url: str = setting("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated for a cluster")
    nats_user: str | None = setting(None, "user name for user/password authentication")
    nats_password: str | None = setting(None, "password for user/password authentication", secret=True)
    nats_token: str | None = setting(None, "token for token authentication", secret=True)
    nats_nkey_seed_file: Path | None = setting(None, "file holding an nkey seed (SU...)")
    nats_creds_file: Path | None = setting(None, "NATS credentials file (JWT and nkey seed)")
    nats_tls_ca_file: Path | None = setting(None, "CA certificate that signs the server's certificate")
    nats_tls_cert_file: Path | None = setting(None, "client certificate for mutual TLS")
    nats_tls_key_file: Path | None = setting(None, "client private key for mutual TLS")
    nats_connect_timeout_s: float = setting(5.0, "seconds to wait for a connection before failing")
    nats_name: str = setting("jetinfer", "client name shown in the server's connection list")
    nats_inbox_prefix: str = setting(
        "_INBOX",
        "prefix of this client's reply inboxes (e.g. _INBOX.<client>, to match per-client permissions)",
    )

    def __post_init__(self) -> None:
        urls = [u.strip() for u in self.nats_url.split(",") if u.strip()]
        require(bool(urls), "nats_url", "give at least one URL such as nats://127.0.0.1:4222")
        for url in urls:
            require(
                url.split("://", 1)[0] in ("nats", "tls", "ws", "wss") and "://" in url,
                "nats_url",
                f"{url!r} must start with nats://, tls://, ws:// or wss://",
            )
        require(
            (self.nats_user is None) == (self.nats_password is None),
            "nats_password" if self.nats_user else "nats_user",
            "user and password go together; set both or neither",
        )
        methods = [
            n
            for n, v in (
                ("nats_user", self.nats_user),
                ("nats_token", self.nats_token),
                ("nats_nkey_seed_file", self.nats_nkey_seed_file),
                ("nats_creds_file", self.nats_creds_file),
            )
            if v
        ]
        require(len(methods) <= 1, methods[-1] if methods else "nats_user", f"choose one of {methods}")
        for name in (
            "nats_nkey_seed_file",
            "nats_creds_file",
            "nats_tls_ca_file",
            "nats_tls_cert_file",
            "nats_tls_key_file",
        ):
            path = getattr(self, name)
            require(path is None or Path(path).is_file(), name, f"{path} is not a readable file")
        require(
            (self.nats_tls_cert_file is None) == (self.nats_tls_key_file is None),
            "nats_tls_key_file",
            "a client certificate needs its key, and a key its certificate",
        )
        require(self.nats_connect_timeout_s > 0, "nats_connect_timeout_s", "must be above 0")
        require(
            bool(re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", self.nats_inbox_prefix)),
            "nats_inbox_prefix",
            f"{self.nats_inbox_prefix!r} must be a subject without wildcards, such as _INBOX.producer_a",
        )

    @property
    def servers(self) -> list[str]:
        """The list of server URLs."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]


@dataclass(kw_only=True)
class StreamSettings:
    """The JetStream stream and consumer configuration; every process that creates them must agree."""

    max_msg_size_bytes: int = setting(8 * 1024 * 1024, "largest request accepted by the INFER stream")
    duplicate_window_s: float = setting(120.0, "JetStream de-duplication window for Nats-Msg-Id")
    results_max_age_s: float = setting(3600.0, "how long durable job replies stay in RESULTS")
    dlq_max_age_s: float = setting(7 * 24 * 3600.0, "how long dead letters stay in DLQ")
    stream_replicas: int = setting(1, "replicas of the INFER, RESULTS and DLQ streams (3 in a cluster)")
    ack_wait_s: float = setting(30.0, "seconds a fetched request may stay unacknowledged before redelivery")
    max_deliver: int = setting(5, "deliveries of a request before it goes to the DLQ")
    max_ack_pending: int = setting(4096, "unacknowledged requests a consumer may have out at once")

    def __post_init__(self) -> None:
        require(
            1024 <= self.max_msg_size_bytes <= 64 * 1024 * 1024, "max_msg_size_bytes", "must be 1 KiB..64 MiB"
        )
        require(self.duplicate_window_s > 0, "duplicate_window_s", "must be above 0")
        require(self.results_max_age_s > 0, "results_max_age_s", "must be above 0")
        require(self.dlq_max_age_s > 0, "dlq_max_age_s", "must be above 0")
        require(self.stream_replicas in (1, 3, 5), "stream_replicas", "must be 1, 3 or 5")
        require(self.ack_wait_s >= 1, "ack_wait_s", "must be at least 1 second")
        require(self.max_deliver >= 1, "max_deliver", "must be at least 1")
        require(self.max_ack_pending >= 1, "max_ack_pending", "must be at least 1")
