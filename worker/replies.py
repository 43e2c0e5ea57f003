"""Publishing one reply to a request's `Jetinfer-Reply-To`, and knowing whether the server took it.

A core NATS publish returns before the server has seen it; a publish the server refuses (no
permission for the subject) comes back later, on its own, as `-ERR 'Permissions Violation for
Publish to "<subject>"'`. `ReplyRefusals` collects those; a reply counts as answered only once a
flush (PING/PONG, which the server answers after everything sent before it) has returned without
its subject among them. Replies to `results.>` are JetStream publishes, answered by a PubAck.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import Final

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from jetinfer.errors import RetryableError, TooLargeError
from jetinfer.protocol import HEADER_MSG_ID, HEADER_STATUS

__all__ = [
    "DURABLE_PREFIX",
    "ReplyRefusals",
    "fits_max_payload",
    "is_durable",
    "publish_reply",
    "valid_reply_subject",
]

#: Replies below this prefix are stored (stream RESULTS) and acknowledged by the stream.
DURABLE_PREFIX: Final = "results."
_REPLY_SUBJECT: Final = re.compile(r"[A-Za-z0-9_\-$]+(\.[A-Za-z0-9_\-$]+)*")
_REFUSED: Final = re.compile(r"permissions violation for publish to \"?([^\"']+)\"?", re.IGNORECASE)
_PUBACK_TIMEOUT_S: Final = 5.0


def valid_reply_subject(subject: str | None) -> bool:
    """Whether `subject` can take a reply: a literal subject (no wildcards or spaces), at most 256 bytes."""
    return subject is not None and len(subject) <= 256 and bool(_REPLY_SUBJECT.fullmatch(subject))


def is_durable(reply_to: str) -> bool:
    """Whether a reply to `reply_to` is stored in RESULTS (a job's reply) rather than sent to an inbox."""
    return reply_to.startswith(DURABLE_PREFIX)


class ReplyRefusals:
    """The subjects the server refused publishes to, numbered in the order the server reported them."""

    def __init__(self, keep: int = 4096) -> None:
        self._count = 0
        self._refused: deque[tuple[int, str]] = deque(maxlen=keep)

    async def on_error(self, exc: Exception) -> bool:
        """The connection's error callback: record a refused publish (True), leave other errors (False)."""
        found = _REFUSED.search(str(exc))
        if found is None:
            return False
        self._count += 1
        self._refused.append((self._count, found.group(1).lower()))
        return True

    def mark(self) -> int:
        """A point to look back to: `refused_since(mark, subject)` says what the server refused after it."""
        return self._count

    def refused_since(self, mark: int, subject: str) -> bool:
        """Whether the server refused a publish to `subject` after `mark`.

        nats-py reports the server's error in lower case, so subjects are compared so: a subject that
        differs from a refused one in case alone counts as refused too.
        """
        wanted = subject.lower()
        return any(number > mark and refused == wanted for number, refused in self._refused)


def fits_max_payload(nc: NatsClient, body: bytes, headers: dict[str, str]) -> bool:
    """Whether a message of `body` and `headers` fits the server's max_payload, which counts both.

    nats-py checks the body alone; a message whose headers take it over the limit reaches the server,
    which then closes the connection, and every reply and ack in flight on it is lost.
    """
    header_bytes = len(b"NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())
    return len(body) + header_bytes <= nc.max_payload


async def publish_reply(
    nc: NatsClient, js: JetStreamContext, reply_to: str, request_id: str, body: bytes, *, ok: bool
) -> None:
    """Publish `body` to `reply_to`; for `results.>`, wait for the stream's ack.

    Raises TooLargeError for a reply over the server's max_payload, RetryableError for anything else
    that failed (not connected, no PubAck in time). A refused core publish does not raise: see
    `ReplyRefusals`.
    """
    headers = {HEADER_STATUS: "ok" if ok else "error"}
    if is_durable(reply_to):
        headers[HEADER_MSG_ID] = f"reply-{request_id}"
    if not fits_max_payload(nc, body, headers):
        raise TooLargeError(
            f"the reply of {len(body)} bytes is over the NATS server's max_payload of {nc.max_payload} "
            "bytes: raise max_payload in the server's configuration, or send fewer frames per request"
        )
    try:
        if is_durable(reply_to):
            # Durable job replies: JetStream publish, acked by the stream; the id drops redelivered twins.
            await js.publish(reply_to, body, headers=headers, timeout=_PUBACK_TIMEOUT_S)
        else:
            await nc.publish(reply_to, body, headers=headers)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise RetryableError(f"cannot publish the reply to {reply_to}: {type(exc).__name__}: {exc}") from exc
