"""Where a reply may go: below a client inbox prefix or `results`, and for a tenant only below its own.

The worker publishes with permissions wider than any producer's (every client's inbox, `results.>`,
`dlq.>`), so a `Jetinfer-Reply-To` it followed blindly would let a producer write where it may not
itself: the reload signal, the DLQ, INFER, the JetStream API, another tenant's inbox or job results.
`ReplyPolicy` is the one place that decides, before anything is run:

| request subject | reply allowed below (defaults) |
| --- | --- |
| `infer.<model>` (no tenant) | `_INBOX.>`, `results.>` |
| `infer.<model>.<tenant>` | `_INBOX.<tenant>.>`, `results.<tenant>.>` |

and never below the worker's own inbox prefix when that prefix is one of its own
(`JETINFER_NATS_INBOX_PREFIX=_INBOX.worker`, as the manifests set it). The tenant comes only from
the request's subject, which the NATS server fixes (each tenant's user may publish `infer.*.<tenant>`
only; docs/operations.md, Tenants), never from a header. Anything else is `InvalidInputError`: the
worker answers nowhere, terminates the request and copies it to the DLQ.

Pure: no NATS calls, no settings read from the environment.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from jetinfer.errors import InvalidInputError
from jetinfer.protocol import HEADER_REPLY_TO
from jetinfer.streams import parse_infer_subject

__all__ = ["DEFAULT_REPLY_PREFIXES", "RESERVED_PREFIXES", "ReplyPolicy", "check_reply_prefix"]

#: What the client library uses: `_INBOX.<...>` inboxes and `results.<...>` durable job replies.
DEFAULT_REPLY_PREFIXES: Final = ("_INBOX", "results")
#: First tokens a reply prefix may never have: the worker's own subjects and the server's.
RESERVED_PREFIXES: Final = ("infer", "dlq", "jetinfer")
_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def check_reply_prefix(prefix: str) -> str | None:
    """Why `prefix` cannot be a reply prefix (a sentence), or None if it can."""
    if not _PREFIX.fullmatch(prefix):
        return f"{prefix!r} must be a subject of literal tokens ([A-Za-z0-9_-], no wildcards, no '$')"
    first = prefix.split(".", 1)[0]
    if first in RESERVED_PREFIXES:
        return f"{prefix!r} would let replies reach the worker's own {first}.> subjects"
    return None


def _below(subject: str, prefix: str) -> bool:
    """Whether `subject` is strictly below `prefix` (at least one more token)."""
    return subject.startswith(prefix + ".") and len(subject) > len(prefix) + 1


@dataclass(frozen=True)
class ReplyPolicy:
    """The reply namespaces of a worker: `prefixes`, and its own inbox prefix to keep replies out of."""

    prefixes: tuple[str, ...] = DEFAULT_REPLY_PREFIXES
    own_inbox_prefix: str | None = None

    def __post_init__(self) -> None:
        if not self.prefixes:
            raise ValueError("a reply policy needs at least one prefix")
        for prefix in self.prefixes:
            problem = check_reply_prefix(prefix)
            if problem is not None:
                raise ValueError(problem)

    @classmethod
    def of(cls, prefixes: Iterable[str], own_inbox_prefix: str | None = None) -> ReplyPolicy:
        """A policy from settings values (a list of prefixes, the worker's `nats_inbox_prefix`)."""
        return cls(prefixes=tuple(prefixes), own_inbox_prefix=own_inbox_prefix)

    def _dotted(self, tenant: str | None) -> tuple[str, ...]:
        """`namespaces(tenant)`, each with its "." (cached: every reply asks)."""
        return _dotted_namespaces(self, tenant)

    def namespaces(self, tenant: str | None) -> tuple[str, ...]:
        """The prefixes replies of `tenant`'s requests (None: no tenant) must be strictly below."""
        return self.prefixes if tenant is None else tuple(f"{p}.{tenant}" for p in self.prefixes)

    def reply_subject(self, reply_to: str, request_subject: str) -> str:
        """The subject to publish the reply of a request on `request_subject` to: `reply_to` itself, if
        it lies in the request's namespaces; InvalidInputError (saying where replies may go) if not."""
        _model, tenant = parse_infer_subject(request_subject)
        own = self.own_inbox_prefix
        if own and own not in self.prefixes and (reply_to == own or _below(reply_to, own)):
            raise InvalidInputError(
                f"{HEADER_REPLY_TO} {reply_to[:64]!r} is the worker's own inbox: replies never go there"
            )
        # One C call for the usual case; a subject equal to a prefix plus "." alone is not below it.
        if reply_to.startswith(self._dotted(tenant)) and not reply_to.endswith("."):
            return reply_to
        allowed = self.namespaces(tenant)
        if any(_below(reply_to, prefix) for prefix in allowed):
            return reply_to
        where = " or ".join(f"{prefix}.>" for prefix in allowed)
        whose = f"requests of tenant {tenant}" if tenant is not None else "requests"
        raise InvalidInputError(
            f"{HEADER_REPLY_TO} {reply_to[:64]!r} is not a reply subject: replies of {whose} go only "
            f"below {where}"
        )


@functools.lru_cache(maxsize=1024)
def _dotted_namespaces(policy: ReplyPolicy, tenant: str | None) -> tuple[str, ...]:
    return tuple(f"{prefix}." for prefix in policy.namespaces(tenant))
