"""Requests that ran out of deliveries without an answer: DLQ copy, `internal` error reply, removal.

The worker answers and `term`s a request itself when its last allowed delivery fails. When the
worker running that last delivery dies or hangs instead, JetStream gives up on the request after
ack_wait and publishes the advisory `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.INFER.worker-<model>`,
while the request stays stored in INFER (WorkQueue streams keep messages nobody acked). `DeadLetters`
listens for that advisory and, for its request: reads it by stream sequence, copies it into DLQ with
the reason, sends its client an `internal` error reply, and deletes it from INFER.

Exactly one worker acts on each request: the advisory subscription is a queue group (one member
gets each advisory), and the DLQ copy carries `Nats-Msg-Id: dlq-INFER-<seq>`, so a second actor (a
sweep, see below) finds its copy refused as a duplicate and sends no second reply.

An advisory is core NATS: if no worker listened when it was sent (every worker was down), the
request would sit in INFER forever. `sweep` finds such requests: when the consumer has nothing
pending and nothing unacknowledged, a request of the model still stored at or below the consumer's
delivered sequence can only be one that ran out of deliveries.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Final

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from jetinfer.cleanup import logged
from jetinfer.errors import BackendError, InvalidInputError, RetryableError
from jetinfer.protocol import HEADER_MSG_ID, HEADER_REPLY_TO, encode_error
from jetinfer.settings import StreamSettings
from jetinfer.streams import INFER_STREAM, consumer_name, dlq_subject, infer_subjects, parse_infer_subject

from .replies import publish_reply, valid_reply_subject
from .reply_policy import ReplyPolicy
from .settle import dlq_headers

__all__ = ["ADVISORY_QUEUE", "DeadLetters", "max_deliveries_subject"]

logger = logging.getLogger(__name__)

MAX_DELIVERIES_PREFIX: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
#: Queue group of the advisory subscriptions: one worker of all gets each advisory.
ADVISORY_QUEUE: Final = "jetinfer-dead-letters"


def max_deliveries_subject(model: str) -> str:
    """The advisory JetStream sends when a request of `model` runs out of deliveries."""
    return f"{MAX_DELIVERIES_PREFIX}.{INFER_STREAM}.{consumer_name(model)}"


class DeadLetters:
    """Buries requests of `models` that ran out of deliveries: DLQ, error reply, delete from INFER."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        models: list[str],
        settings: StreamSettings,
        *,
        reply_policy: ReplyPolicy | None = None,
    ) -> None:
        self._nc = nc
        self._reply_policy = reply_policy or ReplyPolicy()
        self._js = js
        self._models = {consumer_name(m): m for m in models}
        self._settings = settings
        self._subs: list[Subscription] = []
        self.buried = 0  # requests this worker moved to the DLQ from here

    async def start(self) -> None:
        """Subscribe to the MAX_DELIVERIES advisories of every model (queue group: one worker acts)."""
        for model in self._models.values():
            self._subs.append(
                await self._nc.subscribe(
                    max_deliveries_subject(model), queue=ADVISORY_QUEUE, cb=self._on_advisory
                )
            )

    async def stop(self) -> None:
        """Unsubscribe. Safe to call twice."""
        subs, self._subs = self._subs, []
        for sub in subs:
            await logged(logger, f"unsubscribing from {sub.subject}", sub.unsubscribe())

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            event = json.loads(msg.data)
            seq = int(event["stream_seq"])
            deliveries = int(event.get("deliveries") or self._settings.max_deliver)
            model = self._models[str(event["consumer"])]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring a malformed MAX_DELIVERIES advisory (%s): %r", exc, msg.data[:200])
            return
        try:
            await self.bury(model, seq, deliveries)
        except Exception:
            logger.exception("model %s: could not move request #%d to the DLQ", model, seq)

    async def bury(self, model: str, seq: int, deliveries: int, *, found_by: str = "advisory") -> bool:
        """Move the stored request `seq` of `model` to the DLQ and answer it; False if it is gone."""
        try:
            stored = await self._js.get_msg(INFER_STREAM, seq)
        except NotFoundError:
            return False  # answered late, or buried by another worker
        try:
            stored_model, _tenant = parse_infer_subject(stored.subject or "")
        except InvalidInputError:
            return False
        if stored_model != model or stored.data is None:
            return False
        headers = dict(stored.headers or {})
        request_id = headers.get(HEADER_MSG_ID) or f"seq-{seq}"
        error = BackendError(
            f"request ran out of deliveries ({deliveries} of max_deliver {self._settings.max_deliver}) "
            "without an answer: the worker running it stopped or hung"
        )
        copy = dlq_headers(
            headers,
            reason="max_deliveries",
            message=error.message,
            deliveries=deliveries,
            request_id=request_id,
            copy_id=f"dlq-{INFER_STREAM}-{seq}",
        )
        ack = await self._js.publish(dlq_subject(model), stored.data, headers=copy, timeout=5)
        if not ack.duplicate:
            reply_to = headers.get(HEADER_REPLY_TO)
            if valid_reply_subject(reply_to):
                assert reply_to is not None
                with contextlib.suppress(InvalidInputError, RetryableError):
                    reply_to = self._reply_policy.reply_subject(reply_to, stored.subject or "")
                    await publish_reply(
                        self._nc,
                        self._js,
                        reply_to,
                        request_id,
                        encode_error(request_id, error.code, error.message),
                        ok=False,
                    )
            self.buried += 1
            logger.warning(
                "model %s: request %s (#%d) ran out of deliveries; moved to the DLQ (%s)",
                model,
                request_id,
                seq,
                found_by,
            )
        with contextlib.suppress(NotFoundError):
            await self._js.delete_msg(INFER_STREAM, seq)
        return not ack.duplicate

    async def sweep(self, model: str, *, limit: int = 100) -> int:
        """Bury requests of `model` that ran out of deliveries while no worker listened; returns how many."""
        info = await self._js.consumer_info(INFER_STREAM, consumer_name(model))
        if info.num_ack_pending or info.num_pending:
            return 0  # busy: anything stored may still be delivered or answered
        delivered = (info.delivered.stream_seq or 0) if info.delivered is not None else 0
        buried = 0
        for subject in infer_subjects(model):  # requests without a tenant, then tenants' requests
            seq = 0
            while buried < limit:
                try:
                    stored = await self._js.get_msg(INFER_STREAM, seq=seq + 1, subject=subject, next=True)
                except NotFoundError:
                    break
                if stored.seq is None or stored.seq > delivered:
                    break
                seq = stored.seq
                if await self.bury(model, seq, self._settings.max_deliver, found_by="sweep"):
                    buried += 1
        return buried
