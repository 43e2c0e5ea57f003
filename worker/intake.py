"""Intake: keeping pull requests outstanding on the durable consumer, and handing on what arrives.

`PullConsumer` keeps a bounded number of requests asked for from JetStream at all times (a
continuous pull with idle heartbeats, the way nats.go's `Consume` works), so the next batch is
already on its way while the current one runs. A pull that stops answering (no message and no
heartbeat for three heartbeat intervals, or a reconnect) is renewed: no silent stall after a
reconnect. Each pull asks for at most `max_bytes` too: nats-server cuts a client as a slow consumer
once more than its max_pending (64 MiB) waits to be written to it, and a pull of 512 messages of 8
JPEGs each (about 150 KB) asks for 77 MB at once. For the same reason no more is asked for while the
buffer holds `max_bytes` already (512 messages of 8 MiB would be 4 GiB in the worker's memory). It never
decodes and never acknowledges: what it hands on is a `Delivery`, which the settle stage answers for
from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from jetinfer.cleanup import logged

__all__ = ["PULL_MAX_BYTES", "Delivery", "Intake", "PullConsumer", "delivery_info", "pull_max_bytes"]

logger = logging.getLogger(__name__)


def delivery_info(msg: Msg) -> tuple[int, float]:
    """(times delivered, JetStream timestamp in epoch seconds) from the message's ack subject."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4]), int(tokens[7]) / 1e9
    try:
        metadata = msg.metadata
    except Exception:
        return 1, time.time()
    return metadata.num_delivered, metadata.timestamp.timestamp()


@dataclass(slots=True, eq=False)
class Delivery:
    """A message this worker holds, and when it last told the server so (arrival or in-progress)."""

    msg: Msg
    touched: float


class Intake(Protocol):
    """What the pipeline needs of its intake (`PullConsumer`; tests give their own)."""

    capacity: int

    async def start(self) -> None:
        """Start asking for messages."""

    async def get(self, max_items: int, max_wait_s: float) -> list[Delivery]:
        """Up to `max_items` deliveries (an empty list now and then, so the caller can look up)."""

    def buffered_entries(self) -> list[Delivery]:
        """Deliveries received and not yet taken."""

    async def renew(self) -> None:
        """Ask again (after a reconnect)."""

    async def stop(self) -> list[Msg]:
        """Stop asking; return what was received and never taken."""


#: Pull statuses that end a pull request normally (expired, or nothing to deliver): ask again at once.
_NORMAL_END = frozenset({"404", "408"})
#: The 409 that ends a pull whose `max_bytes` are delivered (or whose next message would not fit).
_MAX_BYTES_END = "Message Size Exceeds MaxBytes"
#: Bytes one pull asks for: two outstanding stay well under nats-server's 64 MiB max_pending.
PULL_MAX_BYTES = 8 * 1024 * 1024
#: What a message costs in a pull's max_bytes beyond its payload (subject, reply subject, headers).
_MESSAGE_OVERHEAD_BYTES = 64 * 1024


def pull_max_bytes(max_msg_size_bytes: int) -> int:
    """The bytes a pull asks for: `PULL_MAX_BYTES`, or one message of the largest size the stream
    accepts where that is more (a pull must always be able to deliver the next message)."""
    return max(PULL_MAX_BYTES, max_msg_size_bytes + _MESSAGE_OVERHEAD_BYTES)


class PullConsumer:
    """A continuous pull from `stream`/`durable` into a local queue of at most about `capacity` messages."""

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        durable: str,
        *,
        capacity: int,
        heartbeat_s: float = 2.0,
        expires_s: float = 30.0,
        max_bytes: int = PULL_MAX_BYTES,
    ) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.durable = durable
        self.capacity = max(1, capacity)
        self.heartbeat_s = heartbeat_s
        self.expires_s = max(expires_s, heartbeat_s * 4)
        self.max_bytes = max(1, max_bytes)
        self._queue: deque[Delivery] = deque()
        self._queued_bytes = 0  # payload bytes of the messages in _queue
        self._ready = asyncio.Event()
        self._pending = 0  # messages asked for and not yet received
        self._last_seen = time.monotonic()
        self._inbox = ""
        self._sub: Subscription | None = None
        self._stopping = False
        self._watchdog: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self.renewals = 0

    async def start(self) -> None:
        """Subscribe to the delivery inbox and ask for the first messages."""
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message, pending_msgs_limit=-1)
        self._last_seen = time.monotonic()
        await self.refill()
        self._watchdog = asyncio.create_task(self._watch(), name=f"pull-watchdog-{self.durable}")

    @property
    def buffered(self) -> int:
        """Messages received and not yet taken."""
        return len(self._queue)

    async def _on_message(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        headers = msg.headers
        # Pull statuses come without an ack subject; a request's own "Status" header is not one.
        status = headers.get("Status") if headers and not msg.reply else None
        if not status:
            self._pending = max(0, self._pending - 1)
            self._queue.append(Delivery(msg, self._last_seen))
            self._queued_bytes += len(msg.data)
            self._ready.set()
            return
        if status == "100":  # idle heartbeat (or flow control): the pull is alive
            return
        assert headers is not None, "a status comes in the headers"
        # 404/408/409 end (part of) a pull request; the header says how many asks it cancels.
        cancelled = headers.get("Nats-Pending-Messages")
        if cancelled is not None and cancelled.isdigit():
            self._pending = max(0, self._pending - int(cancelled))
        else:
            self._pending = 0
        description = headers.get("Description", "")
        bytes_delivered = status == "409" and description == _MAX_BYTES_END
        if bytes_delivered and headers.get("Nats-Pending-Bytes") == str(self.max_bytes):
            self.max_bytes *= 2  # it delivered nothing: the next message alone is larger than a pull
            logger.warning(
                "pull %s: a message is larger than a pull's max_bytes; asking for up to %d bytes",
                self.durable,
                self.max_bytes,
            )
        if status in _NORMAL_END or bytes_delivered:
            if not self._stopping:
                await self.refill()
            return
        # 409 (leadership change, consumer deleted, max waiting), 503 (JetStream not ready after a restart):
        # ask again after a pause, not at once, so a server that is coming back is not flooded.
        logger.info(
            "pull %s: status %s %s; asking again in %.1f s",
            self.durable,
            status,
            description,
            self.heartbeat_s / 2,
        )
        if not self._stopping and (self._retry is None or self._retry.done()):
            self._retry = asyncio.create_task(self._refill_later(self.heartbeat_s / 2))

    async def _refill_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.refill()

    async def refill(self) -> None:
        """Ask for more messages when less than half the capacity is buffered or on its way."""
        if self._stopping or self._nc.is_closed or not self._nc.is_connected:
            return
        if self._queued_bytes >= self.max_bytes:  # a pull's worth is here already: ask once it is taken
            return
        want = self.capacity - len(self._queue) - self._pending
        if want < max(1, self.capacity // 2) and not (want > 0 and self._pending == 0):
            return
        request = {
            "batch": want,
            "max_bytes": self.max_bytes,
            "expires": int(self.expires_s * 1e9),
            "idle_heartbeat": int(self.heartbeat_s * 1e9),
        }
        self._pending += want
        try:
            await self._nc.publish(self._subject, json.dumps(request).encode(), reply=self._inbox)
        except Exception as exc:
            self._pending -= want
            logger.warning("pull %s: cannot ask for messages: %s", self.durable, exc)

    async def renew(self) -> None:
        """Forget outstanding asks (after a reconnect or a silent pull) and ask again."""
        self.renewals += 1
        self._pending = 0
        self._last_seen = time.monotonic()
        await self.refill()

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.heartbeat_s)
            silent = time.monotonic() - self._last_seen
            if self._pending > 0 and silent > 3 * self.heartbeat_s:
                logger.warning(
                    "pull %s: no message or heartbeat for %.1f s; renewing the pull", self.durable, silent
                )
                await self.renew()
            elif self._pending == 0:
                await self.refill()

    def buffered_entries(self) -> list[Delivery]:
        """The messages received and not yet taken (the in-progress watchdog keeps them alive too)."""
        return list(self._queue)

    async def get(self, max_items: int, max_wait_s: float, *, poll_s: float = 0.5) -> list[Delivery]:
        """Up to `max_items` messages: waits (up to `poll_s`) for the first, then up to `max_wait_s` for more.

        Returns an empty list when nothing arrived within `poll_s`, so callers can check for shutdown.
        """
        if not self._queue:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), poll_s)
        if not self._queue:
            return []
        if len(self._queue) < max_items and max_wait_s > 0:
            deadline = time.monotonic() + max_wait_s
            while len(self._queue) < max_items:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), remaining)
        count = min(max_items, len(self._queue))
        taken = [self._queue.popleft() for _ in range(count)]
        self._queued_bytes = max(0, self._queued_bytes - sum(len(entry.msg.data) for entry in taken))
        await self.refill()
        return taken

    def take_all(self) -> list[Msg]:
        """Everything buffered (at shutdown, to nak)."""
        taken = [entry.msg for entry in self._queue]
        self._queue.clear()
        self._queued_bytes = 0
        return taken

    async def stop(self, linger_s: float = 0.2) -> list[Msg]:
        """Stop asking; keep listening `linger_s` for messages already on their way; return the unstarted."""
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        if self._pending and linger_s > 0:
            await asyncio.sleep(linger_s)
        if self._sub is not None:
            await logged(logger, f"pull {self.durable}: unsubscribing", self._sub.unsubscribe())
            self._sub = None
        return self.take_all()
