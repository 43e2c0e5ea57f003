"""Settings of the client library (`ClientSettings`) and of the producer CLIs (`jetinfer infer`, `bench`,
`video`: `ProducerSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

from jetinfer.settings import ConnectionSettings, require, setting
from jetinfer.streams import TENANT_NAME_PATTERN

__all__ = ["ClientSettings", "ProducerSettings"]

_DEFAULT_INBOX_PREFIX = "_INBOX"


@dataclass(kw_only=True)
class ClientSettings(ConnectionSettings):
    """Connection plus the tenant this client publishes as (docs/operations.md, Tenants).

    With a tenant, requests go to `infer.<model>.<tenant>`, replies come to inboxes below
    `_INBOX.<tenant>` (the default inbox prefix becomes that) and durable job replies to
    `results.<tenant>.<job>`; the NATS server's permissions for this client's user decide whether it
    may. Without one (the default), everything is as in a single-tenant deployment.
    """

    tenant: str | None = setting(
        None,
        "tenant to publish as: requests to infer.<model>.<tenant>, replies to _INBOX.<tenant>.… and "
        "results.<tenant>.… (the server's permissions for your user must allow it; default: no tenant)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tenant is None:
            return
        require(
            bool(TENANT_NAME_PATTERN.fullmatch(self.tenant)),
            "tenant",
            f"{self.tenant!r} must match [a-z0-9_-]{{1,64}}",
        )
        own = f"_INBOX.{self.tenant}"
        if self.nats_inbox_prefix == _DEFAULT_INBOX_PREFIX:
            self.nats_inbox_prefix = own
        require(
            self.nats_inbox_prefix == own or self.nats_inbox_prefix.startswith(own + "."),
            "nats_inbox_prefix",
            f"tenant {self.tenant} receives replies only below {own}; leave the prefix unset or put it there",
        )


@dataclass(kw_only=True)
class ProducerSettings(ClientSettings):
    """Connection, tenant, and how long to wait for replies."""

    timeout_s: float = setting(30.0, "seconds to wait for each reply")
    concurrency: int = setting(16, "requests in flight at once")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.timeout_s > 0, "timeout_s", "must be above 0")
        require(1 <= self.concurrency <= 100_000, "concurrency", "must be 1..100000")
