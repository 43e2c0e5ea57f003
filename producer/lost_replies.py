"""Requests a worker acknowledged whose reply never came: found through the consumer's ack floor.

A worker acks a request only once the server has taken its reply (it flushes first), but the reply is a
core NATS message: when a server between the worker and this client dies with the reply still in its
buffers, the reply is gone while the ack has landed, and neither connection noticed anything (the
client stays connected to another server, so the re-send after a reconnect does not happen).
JetStream's consumer knows: every request at or below `worker-<model>`'s ack floor
(`ack_floor.stream_seq`) was acknowledged or terminated, so its reply, if any, was sent. A request
still unanswered `grace_s` after it was first seen there is published again, once, as after a
reconnect.

Only requests older than `grace_s` are looked at, so a client whose replies come quickly never asks the
server anything; one consumer-info request per model and check covers every request waiting for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

__all__ = ["AckedWithoutReply"]

logger = logging.getLogger(__name__)

#: The longest pause between two tries to read a consumer that could not be read.
MAX_BACKOFF_S = 30.0
#: Failures in a row after which a consumer that cannot be read is named in a warning.
WARN_AFTER_FAILURES = 5


@dataclasses.dataclass
class _Watched:
    model: str
    request_id: str
    stream_seq: int
    published_at: float
    acked_seen_at: float | None = None


@dataclasses.dataclass
class _Reading:
    failures: int = 0
    next_try_at: float = 0.0
    warned: bool = False


class AckedWithoutReply:
    """Watches the requests a client waits for and publishes again those acknowledged without a reply.

    `ack_floor(model)` returns the consumer's ack floor as a stream sequence, raising when it cannot be
    read; `ask_again(token)` publishes the request again (and `watch`es the new copy), returning its
    stream sequence, or None where it did not publish; `replies_queued()` says whether replies have
    arrived that the client has not handled yet (no request is judged then: its reply may be among
    them). Each request is asked for again at most once.
    """

    def __init__(
        self,
        ack_floor: Callable[[str], Awaitable[int]],
        ask_again: Callable[[str], Awaitable[int | None]],
        replies_queued: Callable[[], bool] = lambda: False,
        *,
        check_s: float = 1.0,
        grace_s: float = 2.0,
    ) -> None:
        self._ack_floor = ack_floor
        self._ask_again = ask_again
        self._replies_queued = replies_queued
        self.check_s = check_s
        self.grace_s = grace_s
        self._watched: dict[str, _Watched] = {}
        self._asked_again: set[str] = set()
        self._readings: dict[str, _Reading] = {}
        self._refused: set[str] = set()  # models whose consumer this client may not read
        #: Requests published again because they were acknowledged without a reply reaching this client.
        self.asked_again = 0

    def watch(self, token: str, model: str, request_id: str, stream_seq: int) -> None:
        """Start (or restart) watching the request waiting under `token`, stored at `stream_seq` in
        INFER."""
        self._watched[token] = _Watched(model, request_id, stream_seq, time.monotonic())

    def forget(self, token: str) -> None:
        """The request under `token` was answered or given up: stop watching it."""
        self._watched.pop(token, None)
        self._asked_again.discard(token)

    def refused(self, model: str, why: str) -> None:
        """The server refused this client `model`'s consumer info (permissions): stop asking, say so once."""
        if model in self._refused:
            return
        self._refused.add(model)
        logger.warning(
            "the server refuses this client the consumer of model %s (%s): a reply lost in a server "
            "failure is not noticed until the request's time-out; a tenant's NATS user needs "
            "$JS.API.CONSUMER.INFO.INFER.* (deploy/nats/accounts.conf)",
            model,
            why,
        )

    async def run(self) -> None:
        """Check every `check_s` until cancelled."""
        while True:
            await asyncio.sleep(self.check_s)
            try:
                await self.check()
            except Exception:  # a bug here must not end the watch, nor go unseen
                logger.exception("looking for requests acknowledged without a reply failed")

    async def check(self) -> None:
        """One round: read the ack floor of each model with a request waiting longer than `grace_s`, and
        publish again every request that has been at or below it for `grace_s` without an answer."""
        now = time.monotonic()
        models = {w.model for w in self._watched.values() if now - w.published_at >= self.grace_s}
        for model in sorted(models - self._refused):
            floor = await self._read_floor(model, now)
            if floor is None:
                continue
            due = []
            for token, watched in list(self._watched.items()):
                if watched.model != model or watched.stream_seq > floor or token in self._asked_again:
                    continue
                if watched.acked_seen_at is None:
                    watched.acked_seen_at = now
                elif now - watched.acked_seen_at >= self.grace_s:
                    due.append(token)
            if due and self._replies_queued():
                continue  # the client is behind on its replies: judge these at the next check
            for token in due:
                await self._publish_again(token)

    async def _read_floor(self, model: str, now: float) -> int | None:
        reading = self._readings.setdefault(model, _Reading())
        if now < reading.next_try_at:
            return None
        try:
            floor = await self._ack_floor(model)
        except Exception as exc:  # a leader being elected, or no permission to read the consumer
            if model in self._refused:
                return None
            reading.failures += 1
            reading.next_try_at = now + min(self.check_s * 2**reading.failures, MAX_BACKOFF_S)
            if reading.failures >= WARN_AFTER_FAILURES and not reading.warned:
                reading.warned = True
                logger.warning(
                    "cannot read the consumer of model %s (%s: %s): a reply lost in a server failure is "
                    "not noticed until the request's time-out; a tenant's NATS user needs "
                    "$JS.API.CONSUMER.INFO.INFER.* (deploy/nats/accounts.conf)",
                    model,
                    type(exc).__name__,
                    exc,
                )
            else:
                logger.debug("cannot read the consumer of model %s: %s", model, exc)
            return None
        reading.failures, reading.next_try_at = 0, 0.0
        return floor

    async def _publish_again(self, token: str) -> None:
        watched = self._watched.get(token)
        if watched is None:
            return
        self._asked_again.add(token)
        try:
            published = await self._ask_again(token)
        except Exception as exc:
            logger.warning("could not publish request %s again: %s", watched.request_id, exc)
            return
        if published is None:  # not published (being published again already): may be asked for later
            self._asked_again.discard(token)
            return
        self.asked_again += 1
        logger.info(
            "request %s for model %s was acknowledged but its reply never came: published again",
            watched.request_id,
            watched.model,
        )
