"""A backlog drained: `jetinfer bench --embedded --backlog N` stores N requests in the INFER stream before
the worker starts, then times the worker answering them.

The closed loop (`--concurrency`) measures the worker together with its load generators: on one machine
a Python client spends about as much CPU per request as the worker does, so the clients, not the
worker, can be what the figure shows. A batch job that pushes every frame of a video and then collects
meets the worker alone, with a stream full of work; so does this. The rate counts from the reply that
makes 10% of N (the worker's start, its probes and first batches left out) to the last, so it is the
worker's steady rate on a full stream.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter

from nats.aio.msg import Msg

from jetinfer.errors import RequestError
from jetinfer.producer.client import Client, Payload, encode_payload
from jetinfer.protocol import request_headers
from jetinfer.settings import ConnectionSettings, StreamSettings
from jetinfer.streams import INFER_STREAM, ensure_streams, infer_subject, register_model

__all__ = ["Backlog"]

#: Requests published between flushes (each is a JPEG or a few: megabytes in the socket at most).
_FLUSH_EVERY = 500
#: How long the stream may take to store what was published.
_STORE_TIMEOUT_S = 120.0


class Backlog:
    """N requests for `model` stored before the worker starts; their replies timed as they come."""

    def __init__(self, model: str, payload: Payload, *, count: int, input_name: str = "input") -> None:
        if count < 10:
            raise ValueError("a backlog needs at least 10 requests")
        self.model = model
        self.payload = payload
        self.count = count
        self.input_name = input_name
        self.arrivals: list[float] = []
        self.errors: Counter[str] = Counter()
        self._client: Client | None = None
        self._done = asyncio.Event()

    async def publish(self, url: str) -> None:
        """Subscribe to the replies, then store `count` requests in INFER (waits until it holds them)."""
        client = self._client = await Client(settings=ConnectionSettings(nats_url=url)).connect()
        streams = StreamSettings()  # the defaults, as the workers' are
        await ensure_streams(client.js, streams)
        await register_model(client.js, self.model, streams)
        inbox = f"_INBOX.backlog-{secrets.token_hex(6)}"
        await client.nc.subscribe(f"{inbox}.*", cb=self._on_reply)
        subject = infer_subject(self.model, None)
        for index in range(self.count):
            request_id = f"backlog-{index}-{secrets.token_hex(4)}"
            body, content_type = encode_payload(request_id, self.payload, input_name=self.input_name)
            headers = request_headers(request_id, f"{inbox}.{index}", content_type=content_type)
            await client.nc.publish(subject, body, headers=headers)
            if index % _FLUSH_EVERY == _FLUSH_EVERY - 1:
                await client.nc.flush()
        await client.nc.flush()
        deadline = time.monotonic() + _STORE_TIMEOUT_S
        while (stored := (await client.js.stream_info(INFER_STREAM)).state.messages) < self.count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"INFER holds {stored} of the {self.count} requests published {_STORE_TIMEOUT_S:g} s ago"
                )
            await asyncio.sleep(0.2)

    async def _on_reply(self, msg: Msg) -> None:
        self.arrivals.append(time.perf_counter())
        try:
            Client.read_reply(msg)
        except RequestError as exc:
            self.errors[exc.code] += 1
        if len(self.arrivals) >= self.count:
            self._done.set()

    async def wait(self, timeout_s: float) -> None:
        """Until every request is answered, or `timeout_s` without a new reply."""
        while not self._done.is_set():
            seen = len(self.arrivals)
            try:
                await asyncio.wait_for(self._done.wait(), timeout_s)
            except TimeoutError:
                if len(self.arrivals) == seen:
                    self.errors["no reply"] += self.count - seen
                    return

    def drain_rate(self) -> tuple[float, float]:
        """(requests answered per second, seconds): from the reply that makes 10% of N to the last."""
        arrivals = sorted(self.arrivals)
        if len(arrivals) < 2:
            return 0.0, 0.0
        first = min(len(arrivals) - 2, self.count // 10)
        span = arrivals[-1] - arrivals[first]
        return ((len(arrivals) - 1 - first) / span if span > 0 else 0.0), span

    async def close(self) -> None:
        """Close the connection (again: nothing)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()
