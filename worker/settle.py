"""Settle: every outcome becomes exactly one action on its message — the only place that acks.

The outcome → action table (`decide`):

====================================  ==============================================================
outcome                               action
====================================  ==============================================================
answered (reply taken by the server)  ack
not started (shutdown, never ran)     nak at once: another worker takes it now
permanent error (bad input, expired)  error reply, DLQ copy (reason: the error's code), term
retryable error (backend, transient)  nak after the growing delay of `nak_delays_ms`; on the last
                                      allowed delivery: error reply, DLQ copy, term
preparation bug (an exception)        a retryable error (`internal`): as above
reply refused by the server           DLQ copy (reason `reply_refused`), term; no error reply (it
                                      would be refused too); counted and logged with the subject
reply over the server's max_payload   a permanent error (`too_large`): error reply, DLQ copy, term
====================================  ==============================================================

A reply to an inbox is answered once a flush after it came back without the server refusing it
(`replies.ReplyRefusals`); flushes are shared by whatever was published meanwhile. A reply to
`results.>` is answered by the stream's PubAck. Every message held, from its arrival until it is
settled, gets `in_progress` once a third of ack_wait has passed since the server last heard of it,
so a slow batch or a long queue is not redelivered to a second worker.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram

from jetinfer.errors import (
    BackendError,
    PermanentError,
    ReplyRefusedError,
    RequestError,
    RetryableError,
    TooLargeError,
)
from jetinfer.protocol import (
    HEADER_DLQ_DELIVERIES,
    HEADER_DLQ_MESSAGE,
    HEADER_DLQ_REASON,
    HEADER_DLQ_TRUNCATED,
    HEADER_MSG_ID,
    HEADER_REQUEST_ID,
    encode_error,
    encode_outputs,
)
from jetinfer.streams import dlq_subject

from .intake import Delivery
from .metrics import WorkerMetrics
from .prepare import PreparedRequest, unprepared
from .replies import ReplyRefusals, fits_max_payload, is_durable, publish_reply
from .run import Outputs, RanBatch
from .settings import WorkerSettings

__all__ = ["AckAction", "Settlement", "Settler", "decide", "dlq_headers"]

logger = logging.getLogger(__name__)

#: Batches of durable (results.>) replies waiting for their PubAcks at once.
DURABLE_BATCHES: Final = 4
#: How long a flush may take before the replies it confirms are given back as unconfirmed.
FLUSH_TIMEOUT_S: Final = 5.0


class AckAction(enum.Enum):
    """What happens to a message once its request is settled."""

    ACK = "ack"  # answered: done
    TERM = "term"  # given up: never redelivered (its copy is in the DLQ)
    NAK = "nak"  # redeliver after `delay_s`


@dataclass(frozen=True)
class Settlement:
    """An action, its delay, and what goes with it."""

    action: AckAction
    delay_s: float = 0.0
    reply_error: bool = False  # send an error reply before acting
    to_dlq: bool = False  # copy the request to the DLQ before acting


def decide(
    error: RequestError | None,
    *,
    deliveries: int,
    max_deliver: int,
    nak_delay_s: float,
    started: bool = True,
) -> Settlement:
    """The row of the outcome → action table for one request (see the module's docstring)."""
    if not started:
        return Settlement(AckAction.NAK, delay_s=0.0)
    if error is None:
        return Settlement(AckAction.ACK)
    if isinstance(error, ReplyRefusedError):
        return Settlement(AckAction.TERM, to_dlq=True)
    if isinstance(error, PermanentError):
        return Settlement(AckAction.TERM, reply_error=True, to_dlq=True)
    if isinstance(error, RetryableError) and deliveries < max_deliver:
        return Settlement(AckAction.NAK, delay_s=nak_delay_s)
    return Settlement(AckAction.TERM, reply_error=True, to_dlq=True)


def dlq_headers(
    headers: Mapping[str, str] | None,
    *,
    reason: str,
    message: str,
    deliveries: int,
    request_id: str,
    copy_id: str,
) -> dict[str, str]:
    """The headers of a request's DLQ copy: its own (less its Nats-Msg-Id) and why it was given up."""
    out = {k: v for k, v in (headers or {}).items() if k != HEADER_MSG_ID}
    out.update(
        {
            HEADER_DLQ_REASON: reason,
            HEADER_DLQ_MESSAGE: message[:512].replace("\r", " ").replace("\n", " "),
            HEADER_DLQ_DELIVERIES: str(deliveries),
            HEADER_REQUEST_ID: request_id[:256],
            HEADER_MSG_ID: copy_id,
        }
    )
    return out


@dataclass(slots=True)
class _Sent:
    """An inbox reply published and not yet confirmed."""

    request: PreparedRequest
    version: str
    mark: int  # ReplyRefusals.mark() before it was published


class Settler:
    """Replies, acks, naks, terms, DLQ copies and in-progress signals for one model's messages."""

    def __init__(
        self,
        model: str,
        nc: NatsClient,
        js: JetStreamContext,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        refusals: ReplyRefusals,
    ) -> None:
        self.model = model
        self._nc = nc
        self._js = js
        self._settings = settings
        self._metrics = metrics
        self._refusals = refusals
        self._held: dict[int, Delivery] = {}
        self._unconfirmed: list[_Sent] = []
        self._confirm_wanted = asyncio.Event()
        self._confirm_lock = asyncio.Lock()
        self._durable: set[asyncio.Task[None]] = set()
        # Read when scraped, not set per message (a gauge's set takes a lock each time).
        metrics.inflight.labels(model=model).set_function(lambda: len(self._held))
        self._outcomes: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.progress_sent = 0  # in_progress signals sent

    # -- holding -------------------------------------------------------------------------------------

    def hold(self, deliveries: Iterable[Delivery]) -> None:
        """Answer for these deliveries from now on (keep them alive until they are settled)."""
        for delivery in deliveries:
            self._held[id(delivery.msg)] = delivery

    def held_messages(self) -> list[Msg]:
        """The messages held and not settled yet."""
        return [delivery.msg for delivery in self._held.values()]

    # -- outcomes ------------------------------------------------------------------------------------

    async def answer(self, ran: RanBatch) -> None:
        """Settle every request of a batch that ran: replies for outputs, the error path for errors."""
        durable = [
            self._reply_durable(request, result, ran)
            if not isinstance(result, RequestError)
            else self.fail(request, result, version=ran.version)
            for request, result in zip(ran.batch.requests, ran.results, strict=True)
            if request.reply_to is not None and is_durable(request.reply_to)
        ]
        for request, result in zip(ran.batch.requests, ran.results, strict=True):
            if request.reply_to is not None and is_durable(request.reply_to):
                continue
            if isinstance(result, RequestError):
                await self.fail(request, result, version=ran.version)
            else:
                await self._reply_inbox(request, result, ran)
        if durable:
            self._spawn_durable(durable)
            while len(self._durable) >= DURABLE_BATCHES:
                await asyncio.wait(self._durable, return_when=asyncio.FIRST_COMPLETED)

    async def fail(self, request: PreparedRequest, error: RequestError, *, version: str = "") -> None:
        """The error path: an error reply and a DLQ copy where the table says so, then the action."""
        settlement = decide(
            error,
            deliveries=request.deliveries,
            max_deliver=self._settings.max_deliver,
            nak_delay_s=self._settings.nak_delay_s(request.deliveries),
        )
        if settlement.reply_error and request.reply_to is not None:
            body = encode_error(request.request_id, error.code, error.message)
            try:
                await publish_reply(self._nc, self._js, request.reply_to, request.request_id, body, ok=False)
            except RequestError as exc:
                logger.warning(
                    "model %s: the error reply to %s failed: %s", self.model, request.reply_to, exc
                )
        if settlement.to_dlq:
            await self._copy_to_dlq(request, error)
        await self._act(request.msg, settlement, request=request, version=version, status=error.code)

    async def give_back(self, msgs: Sequence[Msg]) -> None:
        """Requests that never started (shutdown): nak at once, so another worker takes them now."""
        settlement = decide(None, deliveries=0, max_deliver=1, nak_delay_s=0.0, started=False)
        await asyncio.gather(*(self._act(msg, settlement) for msg in msgs))

    async def preparation_failed(self, msgs: Sequence[Msg], exc: Exception) -> None:
        """A bug in preparing these messages: each is a retryable `internal` failure (nak with back-off;
        on its last delivery a DLQ copy and term). No reply: its reply subject was never checked."""
        error = BackendError(f"preparing the request failed: {type(exc).__name__}: {exc}")
        for msg in msgs:
            await self.fail(unprepared(msg), error)

    # -- replies -------------------------------------------------------------------------------------

    def _body(self, request: PreparedRequest, outputs: Outputs, ran: RanBatch) -> bytes:
        now = time.time()
        return encode_outputs(
            request.request_id,
            self.model,
            ran.version,
            outputs,
            {
                "queue_ms": round(max(0.0, ran.started_at - request.enqueued_at) * 1000, 3),
                "infer_ms": round(ran.infer_s * 1000, 3),
                "total_ms": round(max(0.0, now - request.enqueued_at) * 1000, 3),
            },
        )

    async def _publish_ok(self, request: PreparedRequest, outputs: Outputs, ran: RanBatch) -> int | None:
        """Publish a request's reply: the refusals mark from just before, or None where it could not be
        published (the request is then settled as a failure)."""
        assert request.reply_to is not None, "only requests with a reply subject are answered"
        mark = self._refusals.mark()
        body = self._body(request, outputs, ran)
        try:
            await publish_reply(self._nc, self._js, request.reply_to, request.request_id, body, ok=True)
        except RequestError as exc:
            refused = self._refusals.refused_since(mark, request.reply_to)
            error = self._refused(request, ran.version) if refused else exc
            await self.fail(request, self._not_published(request, error, ran.version), version=ran.version)
            return None
        return mark

    async def _reply_inbox(self, request: PreparedRequest, outputs: Outputs, ran: RanBatch) -> None:
        if request.reply_to is None:  # nobody to answer: done
            await self._act(request.msg, Settlement(AckAction.ACK), request=request, version=ran.version)
            return
        mark = await self._publish_ok(request, outputs, ran)
        if mark is not None:  # acked once a flush confirms the server took it
            self._unconfirmed.append(_Sent(request, ran.version, mark))
            self._confirm_wanted.set()

    async def _reply_durable(self, request: PreparedRequest, outputs: Outputs, ran: RanBatch) -> None:
        if await self._publish_ok(request, outputs, ran) is not None:  # the stream's PubAck came
            await self._act(request.msg, Settlement(AckAction.ACK), request=request, version=ran.version)

    def _spawn_durable(self, steps: list[Coroutine[Any, Any, None]]) -> None:
        async def settle_all() -> None:
            for outcome in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    logger.error("model %s: settling a durable reply failed: %r", self.model, outcome)

        task = asyncio.create_task(settle_all(), name=f"durable-replies-{self.model}")
        self._durable.add(task)
        task.add_done_callback(self._durable.discard)

    def _refused(self, request: PreparedRequest, version: str) -> ReplyRefusedError:
        """The server refused a reply (no permission): counted and logged, once, with its subject."""
        self._metrics.replies_refused.labels(model=self.model, version=version, status="reply_refused").inc()
        logger.warning(
            "model %s: the server refused the reply to %s for request %s (no permission to publish there); "
            "terminated and copied to the DLQ",
            self.model,
            request.reply_to,
            request.request_id,
        )
        return ReplyRefusedError(f"the NATS server refused to deliver the reply to {request.reply_to}")

    def _not_published(self, request: PreparedRequest, error: RequestError, version: str) -> RequestError:
        """A reply too large for the server is counted and logged, once, with its subject."""
        if isinstance(error, TooLargeError):
            self._metrics.replies_refused.labels(model=self.model, version=version, status="too_large").inc()
            logger.warning(
                "model %s: the reply to %s for request %s is too large for the server (%s)",
                self.model,
                request.reply_to,
                request.request_id,
                error,
            )
        return error

    async def run_confirmations(self) -> None:
        """Confirm published inbox replies (a flush each round, for all of them), then ack them."""
        while True:
            await self._confirm_wanted.wait()
            self._confirm_wanted.clear()
            await self.confirm()

    async def confirm(self) -> None:
        """One round: flush, then ack what the server took and settle what it refused."""
        async with self._confirm_lock:
            sent, self._unconfirmed = self._unconfirmed, []
            if not sent:
                return
            try:
                await self._nc.flush(timeout=FLUSH_TIMEOUT_S)  # type: ignore[arg-type]
            except Exception as exc:
                error = RetryableError(
                    f"could not confirm that the server took the reply: {type(exc).__name__}"
                )
                for item in sent:
                    await self.fail(item.request, error, version=item.version)
                return
            for item in sent:
                assert item.request.reply_to is not None, "only replies are confirmed"
                if self._refusals.refused_since(item.mark, item.request.reply_to):
                    await self.fail(
                        item.request, self._refused(item.request, item.version), version=item.version
                    )
                else:
                    await self._act(
                        item.request.msg,
                        Settlement(AckAction.ACK),
                        request=item.request,
                        version=item.version,
                    )

    async def drain(self) -> None:
        """Wait until every reply published so far is confirmed and settled (at shutdown)."""
        await self.confirm()
        if self._durable:
            await asyncio.wait(self._durable)

    # -- acting --------------------------------------------------------------------------------------

    async def _copy_to_dlq(self, request: PreparedRequest, error: RequestError) -> None:
        headers = dlq_headers(
            request.msg.headers,
            reason=error.code,
            message=error.message,
            deliveries=request.deliveries,
            request_id=request.request_id,
            copy_id=f"dlq-{request.request_id[:200]}-{request.deliveries}",
        )
        data = request.msg.data
        if not fits_max_payload(self._nc, data, headers):
            # The copy is the request plus its reasons: where that is over max_payload, the reasons alone.
            headers[HEADER_DLQ_TRUNCATED] = str(len(data))
            data = b""
        try:
            await self._js.publish(dlq_subject(self.model), data, headers=headers, timeout=5)
        except Exception as exc:
            logger.error("model %s: could not copy %s to the DLQ: %s", self.model, request.request_id, exc)

    async def _act(
        self,
        msg: Msg,
        settlement: Settlement,
        *,
        request: PreparedRequest | None = None,
        version: str = "",
        status: str = "ok",
    ) -> None:
        action = settlement.action
        if action is not AckAction.NAK and request is not None:
            # Counted before the ack goes out (sending it may yield), so that once the server has the ack
            # the counters are final.
            answered, duration = self._outcome_series(version, status)
            answered.inc()
            duration.observe(max(0.0, time.time() - request.enqueued_at))
        try:
            if action is AckAction.ACK:
                await msg.ack()
            elif action is AckAction.TERM:
                await msg.term()
            else:
                await msg.nak(delay=settlement.delay_s or None)
        except Exception as exc:
            what = request.request_id if request is not None else "a request"
            logger.warning("model %s: %s of %s failed: %s", self.model, action.value, what, exc)
        self._held.pop(id(msg), None)

    def _outcome_series(self, version: str, status: str) -> tuple[Counter, Histogram]:
        """The request counter and duration histogram of (version, status), looked up once each
        (`labels()` costs more than the observation itself; a worker sees few versions and codes)."""
        series = self._outcomes.get((version, status))
        if series is None:
            labels = {"model": self.model, "version": version, "status": status}
            series = (
                self._metrics.requests.labels(**labels),
                self._metrics.request_duration.labels(**labels),
            )
            self._outcomes[(version, status)] = series
        return series

    # -- keeping messages alive ----------------------------------------------------------------------

    async def run_keepalive(self, buffered: Callable[[], list[Delivery]]) -> None:
        """Every sixth of ack_wait, `in_progress` for what was not heard of for a third of it."""
        ack_wait = self._settings.ack_wait_s
        while True:
            await asyncio.sleep(max(0.1, ack_wait / 6))
            await self.keep_alive(ack_wait / 3, buffered())

    async def keep_alive(self, older_than_s: float, buffered: Sequence[Delivery] = ()) -> int:
        """`in_progress` for every held (or `buffered`) message untouched for `older_than_s`; how many."""
        now = time.monotonic()
        stale = [d for d in (*self._held.values(), *buffered) if now - d.touched > older_than_s]
        for delivery in stale:
            delivery.touched = now
        if stale:
            await asyncio.gather(*(self._in_progress(delivery.msg) for delivery in stale))
            self.progress_sent += len(stale)
        return len(stale)

    async def _in_progress(self, msg: Msg) -> None:
        try:
            await msg.in_progress()
        except Exception as exc:
            logger.debug("model %s: in_progress failed: %s", self.model, exc)
