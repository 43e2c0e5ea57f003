"""Forming batches: a chunk of deliveries → prepared requests → images decoded on the CPU where the
strategy decodes there → immutable batches, on the event loop when that is cheap, else on the threads.

Checks and msgpack parsing are pure Python, which holds the GIL in a pool thread just the same, so a
chunk with nothing to decode and few tensor bytes is formed on the event loop (two thread hops cost
more than the work). Several images are decoded on several threads at once (Pillow releases the GIL
while it decodes); anything else goes to one thread in one trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from nats.aio.msg import Msg

from jetinfer.protocol import IMAGE_CONTENT_TYPES, Limits
from jetinfer.repository import ModelConfig

from .batcher import Batch, make_batches
from .prepare import PreparedRequest, prepare_request, request_content_type
from .preprocess import Preprocessing
from .reply_policy import ReplyPolicy
from .settings import WorkerSettings

__all__ = ["BatchFormer", "Formed"]

#: Tensor bytes a chunk may hold and still be formed on the event loop.
INLINE_TENSOR_BYTES = 1 << 20

#: Batches, and the requests refused before batching (their `error` says why).
Formed = tuple[list[Batch], list[PreparedRequest]]


class BatchFormer:
    """Forms the batches of one model server, with its preprocessing strategy and the decode threads."""

    def __init__(
        self,
        preprocessing: Preprocessing,
        pool: ThreadPoolExecutor,
        *,
        threads: int,
        limits: Limits,
        reply_policy: ReplyPolicy,
    ) -> None:
        self._preprocessing = preprocessing
        self._pool = pool
        self._threads = threads
        self._limits = limits
        self._reply_policy = reply_policy

    @classmethod
    def of(
        cls, preprocessing: Preprocessing, pool: ThreadPoolExecutor, *, threads: int, settings: WorkerSettings
    ) -> BatchFormer:
        """The former a worker with `settings` uses: its size limit and its reply policy."""
        return cls(
            preprocessing,
            pool,
            threads=threads,
            limits=Limits(max_bytes=settings.max_msg_size_bytes),
            reply_policy=ReplyPolicy.of(settings.reply_prefixes, settings.nats_inbox_prefix),
        )

    async def form(self, msgs: Sequence[Msg], config: ModelConfig, max_batch: int) -> Formed:
        """Batches of at most `max_batch` frames from `msgs`, for a version with `config`."""
        loop = asyncio.get_running_loop()
        cpu_images, tensor_bytes = self._work(msgs)
        if cpu_images == 0 and tensor_bytes <= INLINE_TENSOR_BYTES:
            # Images inside msgpack (BYTES) are decoded on a thread by `batch`.
            return await self.batch(self._prepare(msgs, config, max_batch, decode=False), config, max_batch)
        if cpu_images < 2 or self._threads < 2:
            return await loop.run_in_executor(self._pool, self._form_here, msgs, config, max_batch)
        size = -(-len(msgs) // min(self._threads, len(msgs)))
        chunks = [msgs[i : i + size] for i in range(0, len(msgs), size)]
        parts = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._prepare, chunk, config, max_batch) for chunk in chunks)
        )
        prepared = [request for part in parts for request in part]
        batches = await loop.run_in_executor(self._pool, make_batches, prepared, max_batch)
        return batches, [r for r in prepared if r.error is not None]

    async def batch(self, prepared: list[PreparedRequest], config: ModelConfig, max_batch: int) -> Formed:
        """Batches of requests prepared already (a front's, in the engine process), the images the strategy
        decodes on the CPU decoded first, on a thread."""
        if any(self._decodes(request) for request in prepared):
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self._decode_and_batch, prepared, config, max_batch
            )
        return make_batches(prepared, max_batch), [r for r in prepared if r.error is not None]

    def _work(self, msgs: Sequence[Msg]) -> tuple[int, int]:
        """(images to decode on the CPU, bytes of tensor requests) in `msgs`."""
        cpu_images = tensor_bytes = 0
        for msg in msgs:
            content_type = request_content_type(msg.headers)
            if content_type not in IMAGE_CONTENT_TYPES:
                tensor_bytes += len(msg.data)
            elif not self._preprocessing.keeps_encoded(content_type, msg.data):
                cpu_images += 1
        return cpu_images, tensor_bytes

    def _decodes(self, request: PreparedRequest) -> bool:
        """Whether `request` has images the strategy decodes on the CPU."""
        return (
            bool(request.encoded)
            and request.error is None
            and not self._preprocessing.keeps_encoded(request.content_type, request.encoded[0])
        )

    def _prepare(
        self, msgs: Sequence[Msg], config: ModelConfig, max_batch: int, *, decode: bool = True
    ) -> list[PreparedRequest]:
        """Prepare each message and (with `decode`) decode the images the strategy decodes on the CPU."""
        prepared = []
        for msg in msgs:
            request = prepare_request(
                msg, config, max_batch=max_batch, limits=self._limits, reply_policy=self._reply_policy
            )
            if decode and self._decodes(request):
                self._preprocessing.decode_request(request, config)
            prepared.append(request)
        return prepared

    def _decode_and_batch(
        self, prepared: list[PreparedRequest], config: ModelConfig, max_batch: int
    ) -> Formed:
        for request in prepared:
            if self._decodes(request):
                self._preprocessing.decode_request(request, config)
        return make_batches(prepared, max_batch), [r for r in prepared if r.error is not None]

    def _form_here(self, msgs: Sequence[Msg], config: ModelConfig, max_batch: int) -> Formed:
        prepared = self._prepare(msgs, config, max_batch)
        return make_batches(prepared, max_batch), [r for r in prepared if r.error is not None]
