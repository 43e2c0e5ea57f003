"""Publishing one reply to a request's `Jetinfer-Reply-To`: a core NATS inbox, or a durable `results.>`."""

from __future__ import annotations

import re
from typing import Final

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from jetinfer.errors import RetryableError
from jetinfer.protocol import HEADER_MSG_ID, HEADER_STATUS

__all__ = ["publish_reply", "valid_reply_subject"]

_REPLY_SUBJECT: Final = re.compile(r"[A-Za-z0-9_\-$]+(\.[A-Za-z0-9_\-$]+)*")


def valid_reply_subject(subject: str | None) -> bool:
    """Whether `subject` can take a reply: a literal subject (no wildcards or spaces), at most 256 bytes."""
    return subject is not None and len(subject) <= 256 and bool(_REPLY_SUBJECT.fullmatch(subject))


async def publish_reply(
    nc: NatsClient, js: JetStreamContext, reply_to: str, request_id: str, body: bytes, *, ok: bool
) -> None:
    """Publish `body` to `reply_to`; for `results.>`, wait for the stream's ack. Raises RetryableError."""
    headers = {HEADER_STATUS: "ok" if ok else "error"}
    try:
        if reply_to.startswith("results."):
            # Durable job replies: JetStream publish, acked by the stream; the id drops redelivered twins.
            headers[HEADER_MSG_ID] = f"reply-{request_id}"
            await js.publish(reply_to, body, headers=headers, timeout=5)
        else:
            await nc.publish(reply_to, body, headers=headers)
    except Exception as exc:
        raise RetryableError(f"cannot publish the reply to {reply_to}: {type(exc).__name__}: {exc}") from exc
