"""One model's serving pipeline: fetch → prepare → infer → reply → ack, as three overlapping stages.

::

    PullConsumer ─▶ fetch stage (decode + validate + batch, in the decode pool)
                     ─▶ batch queue (bounded: pipeline_depth) ─▶ infer stage (one inference thread
                        per batch slot: one on a GPU; --parallel-batches for onnxruntime on the CPU)
                     ─▶ reply queue (bounded) ─▶ reply stage (publish replies, then ack)

Fetching and decoding batch N+1 overlaps inference of batch N, and replies of batch N are
published while N+1 runs. Every message ends in exactly one `decide_ack` decision.

Every message this worker holds, from its arrival (still buffered in the pull, waiting for the
engine, or running) until its ack, gets `in_progress` once a third of ack_wait has passed since it
last told the server, so a slow batch is not redelivered to a second worker. A batch that fails
is split in halves, recursively, so one poison request fails alone (in about 2·log2(batch) runs)
and its batch-mates are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Histogram

from jetinfer.errors import BackendError, DeadlineExceededError, RequestError
from jetinfer.images import decode_pixels
from jetinfer.protocol import (
    HEADER_MSG_ID,
    IMAGE_CONTENT_TYPES,
    Limits,
    encode_error,
    encode_outputs,
)
from jetinfer.repository import PreprocessConfig
from jetinfer.streams import INFER_STREAM, consumer_name, dlq_subject

from .batcher import Batch, make_batches, split_outputs
from .consumer import AckAction, PullConsumer, Received, decide_ack
from .decode_processes import ProcessDecoder
from .gpu_decode import GpuJpegDecoder, GpuNormaliser
from .metrics import WorkerMetrics
from .reload import LoadedModel, ModelSlot
from .replies import publish_reply
from .reply_policy import ReplyPolicy
from .requests import (
    PreparedRequest,
    check_deadline,
    is_jpeg,
    leaves_encoded,
    prepare_request,
    request_content_type,
)
from .settings import WorkerSettings

__all__ = ["ModelServer"]

logger = logging.getLogger(__name__)

_STOP = None
_INLINE_PREPARE_BYTES = 1 << 20  # tensor bytes a batch may hold and still be prepared on the event loop
_DURABLE_BATCHES = 4  # batches of durable (results.>) replies waiting for PubAcks at once
_GPU_DECODE_UP_TO = 4  # with --gpu-decode and --decode-processes, smaller JPEG batches decode on the GPU


Outputs = dict[str, npt.NDArray[Any]]


@dataclass
class _Done:
    """A batch that ran: per request, its outputs or the error that ended it."""

    batch: Batch
    loaded_version: str
    started_at: float
    infer_s: float
    results: list[Outputs | RequestError]


def _few_jpegs(images: list[bytes]) -> bool:
    """A batch small enough to decode on the GPU when decoding processes are there too."""
    return len(images) <= _GPU_DECODE_UP_TO and all(is_jpeg(image) for image in images)


def _request_error(exc: BaseException) -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    return BackendError(f"{type(exc).__name__}: {exc}")


class ModelServer:
    """Serves one model from its consumer `worker-<model>` until stopped."""

    def __init__(
        self,
        *,
        model: str,
        nc: NatsClient,
        js: JetStreamContext,
        settings: WorkerSettings,
        slot: ModelSlot,
        metrics: WorkerMetrics,
        decode_pool: ThreadPoolExecutor,
    ) -> None:
        self.model = model
        self._nc = nc
        self._js = js
        self._settings = settings
        self._slot = slot
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._infer_pool: ThreadPoolExecutor | None = None  # one thread per batch slot, made at start
        self.batch_slots = 1
        self._batches: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=settings.pipeline_depth)
        self._room = asyncio.Event()  # set when the infer stage takes a batch: room to form the next
        self._done: asyncio.Queue[_Done | None] = asyncio.Queue(maxsize=settings.pipeline_depth)
        self._held: dict[int, Received] = {}
        self._stopping = asyncio.Event()
        self._fetch_task: asyncio.Task[None] | None = None
        self._infer_tasks: list[asyncio.Task[None]] = []
        self._reply_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._infer_running = 0
        self._engine_busy = 0  # batches in the infer stage's hands right now
        self._consumer: PullConsumer | None = None
        self._limits = Limits(max_bytes=settings.max_msg_size_bytes)
        self._reply_policy = ReplyPolicy.of(settings.reply_prefixes, settings.nats_inbox_prefix)
        self.batches_run = 0
        self._gpu_decoder: GpuJpegDecoder | None = None
        self._gpu_normaliser: GpuNormaliser | None = None
        self._gpu_prep_pool: ThreadPoolExecutor | None = None  # decodes the next batch on the GPU
        self._process_decoder: ProcessDecoder | None = None  # --decode-processes
        self._pinned = False  # whether the process decoder's shared block is page-locked for the GPU
        self.progress_sent = 0  # in_progress signals sent (slow batches, long queues)
        self.isolated_runs = 0  # single-request re-runs after a failed batch
        self._inflight = metrics.inflight.labels(model=model)
        self._queue_wait = metrics.queue_wait.labels(model=model)
        self._outcomes: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    @property
    def max_batch(self) -> int:
        """Frames per batch: the setting, capped by the serving version's config."""
        config_max = self._slot.current.config.max_batch if self._slot.current else 1
        return min(self._settings.max_batch or config_max, config_max)

    async def start(self) -> None:
        """Start pulling and the three stages."""
        capacity = self.max_batch * self._settings.fetch_batches
        self._consumer = PullConsumer(
            self._nc,
            INFER_STREAM,
            consumer_name(self.model),
            capacity=capacity,
            heartbeat_s=self._settings.heartbeat_s,
        )
        current = self._slot.current
        if self._settings.gpu_decode and current is not None and current.config.preprocess is not None:
            # Refuse at start, not at the first request, where the GPU decoder cannot work.
            self._gpu_decoder = await asyncio.to_thread(
                GpuJpegDecoder,
                current.config.preprocess,
                device=self._settings.device,
                max_frames=self.max_batch,
            )
        if self._settings.gpu_normalise and current is not None and current.config.preprocess is not None:
            self._gpu_normaliser = await asyncio.to_thread(
                GpuNormaliser,
                current.config.preprocess,
                device=self._settings.device,
                max_frames=self.max_batch,
            )
        if self._settings.decode_processes and self._gpu_normaliser is not None and current is not None:
            await asyncio.to_thread(self._start_process_decoder, current.config.preprocess)
        if self._gpu_decoder is not None or self._gpu_normaliser is not None:
            self._gpu_prep_pool = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"gpu-prep-{self.model}"
            )
        if self._gpu_decoder is None and self._gpu_normaliser is None:
            # Decided once: a later version with fewer slots serialises on its own lock.
            self.batch_slots = current.backend.batch_slots if current is not None else 1
        self._infer_pool = ThreadPoolExecutor(
            max_workers=self.batch_slots, thread_name_prefix=f"infer-{self.model}"
        )
        await self._consumer.start()
        self._infer_running = self.batch_slots
        self._fetch_task = asyncio.create_task(self._fetch_stage(), name=f"fetch-{self.model}")
        self._infer_tasks = [
            asyncio.create_task(self._infer_stage(), name=f"infer-{self.model}-{i}")
            for i in range(self.batch_slots)
        ]
        self._reply_task = asyncio.create_task(self._reply_stage(), name=f"reply-{self.model}")
        self._watchdog_task = asyncio.create_task(self._progress_watchdog(), name=f"progress-{self.model}")
        logger.info(
            "model %s: serving from consumer %s (max_batch=%d, batches at once=%d)",
            self.model,
            consumer_name(self.model),
            self.max_batch,
            self.batch_slots,
        )

    def _start_process_decoder(self, preprocess: PreprocessConfig | None) -> None:
        assert preprocess is not None, "decoding processes need an image model"
        assert self._gpu_normaliser is not None, "decoding processes feed the GPU normaliser"
        decoder = ProcessDecoder(
            preprocess, processes=self._settings.decode_processes, max_frames=self.max_batch
        )
        self._pinned = self._gpu_normaliser.pin(decoder.buffer)
        self._process_decoder = decoder
        logger.info(
            "model %s: decoding images in %d processes (%d MB shared%s)",
            self.model,
            decoder.processes,
            decoder.buffer.nbytes >> 20,
            ", page-locked" if self._pinned else "",
        )

    def _close_process_decoder(self) -> None:
        decoder, self._process_decoder = self._process_decoder, None
        if decoder is None:
            return
        if self._pinned and self._gpu_normaliser is not None:
            self._gpu_normaliser.unpin(decoder.buffer)
        decoder.close()

    async def on_reconnect(self) -> None:
        """After a reconnect, outstanding pulls may be gone: ask again."""
        if self._consumer is not None:
            await self._consumer.renew()

    # -- fetch stage -------------------------------------------------------------------------------

    def _prepare_chunk(self, msgs: list[Msg], config: Any, max_batch: int) -> list[PreparedRequest]:
        gpu_jpeg = self._gpu_decoder is not None
        gpu_pixels = self._gpu_normaliser is not None
        defer = self._process_decoder is not None
        return [
            prepare_request(
                m,
                config,
                max_batch=max_batch,
                limits=self._limits,
                gpu_jpeg=gpu_jpeg,
                gpu_pixels=gpu_pixels,
                defer_images=defer,
                reply_policy=self._reply_policy,
            )
            for m in msgs
        ]

    async def _prepare(self, msgs: list[Msg]) -> tuple[list[Batch], list[PreparedRequest]]:
        loop = asyncio.get_running_loop()
        current = self._slot.current
        assert current is not None
        config, max_batch = current.config, self.max_batch
        threads = self._settings.decode_threads
        gpu_jpeg = self._gpu_decoder is not None
        deferred = self._process_decoder is not None  # every image decodes in the decoding processes
        cpu_images = 0
        tensor_bytes = 0
        for m in msgs:
            content_type = request_content_type(m.headers)
            if content_type not in IMAGE_CONTENT_TYPES:
                tensor_bytes += len(m.data)
            elif not leaves_encoded(content_type, m.data, gpu_jpeg=gpu_jpeg, defer_images=deferred):
                cpu_images += 1
        if cpu_images == 0 and tensor_bytes <= _INLINE_PREPARE_BYTES:
            # Nothing to decode, little to copy: checks and msgpack parsing are pure Python, which holds
            # the GIL in a pool thread just the same, and the two thread hops cost more than the work.
            return self._prepare_and_batch(msgs, config, max_batch)
        if cpu_images >= 2 and threads > 1:
            size = -(-len(msgs) // min(threads, len(msgs)))
            chunks = [msgs[i : i + size] for i in range(0, len(msgs), size)]
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(self._decode_pool, self._prepare_chunk, c, config, max_batch)
                    for c in chunks
                )
            )
            prepared = [r for part in parts for r in part]
        else:
            # One trip to the pool for decoding and batching: a thread hop per step costs more than
            # the work itself for small tensor requests.
            return await loop.run_in_executor(
                self._decode_pool, self._prepare_and_batch, msgs, config, max_batch
            )
        rejected = [r for r in prepared if r.error is not None]
        batches = await loop.run_in_executor(self._decode_pool, make_batches, prepared, max_batch)
        return batches, rejected

    def _prepare_and_batch(
        self, msgs: list[Msg], config: Any, max_batch: int
    ) -> tuple[list[Batch], list[PreparedRequest]]:
        prepared = self._prepare_chunk(msgs, config, max_batch)
        return make_batches(prepared, max_batch), [r for r in prepared if r.error is not None]

    async def _fetch_stage(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            # Form a batch only when it can be queued: requests keep arriving in the consumer's buffer
            # while the engine is busy, so batches fill under load and a lone request at idle goes at once.
            while self._batches.full() and not self._stopping.is_set():
                self._room.clear()
                await self._room.wait()
            if self._stopping.is_set():
                break
            entries = await self._consumer.get(self.max_batch, self._settings.max_wait_ms / 1000.0)
            if not entries:
                continue
            msgs = [entry.msg for entry in entries]
            for entry in entries:
                self._held[id(entry.msg)] = entry
            self._inflight.set(len(self._held))
            try:
                batches, rejected = await self._prepare(msgs)
            except Exception:  # a bug in preparation must not lose the messages
                logger.exception("model %s: preparing %d requests failed", self.model, len(msgs))
                await asyncio.gather(*(self._nak(m, 1.0) for m in msgs))
                continue
            for request in rejected:
                await self._finish(request, request.error, version="")
            for batch in batches:
                if self._stopping.is_set():
                    await self._release_unstarted(batch.requests)
                    continue
                engine_idle = self._engine_busy == 0 and self._batches.empty()
                if (
                    self._gpu_prep_pool is not None
                    and (batch.encoded is not None or batch.pixels)
                    and not engine_idle
                ):
                    # Decode on the GPU now, on its own stream, while the engine runs the batch before.
                    # With the engine idle there is nothing to overlap: the infer thread decodes it,
                    # which saves a lone request a round trip through this thread (idle latency).
                    await asyncio.get_running_loop().run_in_executor(
                        self._gpu_prep_pool, self._prepare_on_gpu, batch
                    )
                await self._batches.put(batch)
        for _ in range(self.batch_slots):  # one end marker per infer task
            await self._batches.put(_STOP)

    # -- infer stage -------------------------------------------------------------------------------

    def _prepare_on_gpu(self, batch: Batch) -> None:
        """Decode (or normalise) `batch` onto the GPU ahead of its run; on failure leave it to `_run`,
        whose batch splitting finds the request that cannot be decoded."""
        current = self._slot.current
        preprocess = current.config.preprocess if current is not None else None
        by_normaliser = batch.pixels or self._process_decoder is not None
        tool = self._gpu_normaliser if by_normaliser else self._gpu_decoder
        if preprocess is None or tool is None or tool.config != preprocess:
            return  # the infer stage prepares it, with the preprocessing of the version that runs it
        try:
            batch.on_device = self._preprocess_on_gpu(batch, preprocess)
            batch.prepared_for = preprocess
        except RequestError as exc:
            logger.debug("model %s: decoding ahead failed (%s); the batch run will split it", self.model, exc)

    def _preprocess_on_gpu(self, batch: Batch, preprocess: PreprocessConfig) -> Any:
        """The model input of a JPEG (`--gpu-decode`) or pixel (`--gpu-normalise`) batch, on the GPU."""
        encoded, decoder = batch.encoded, self._process_decoder
        if encoded is not None and self._gpu_decoder is not None and _few_jpegs(encoded):
            decoder = None  # with --gpu-decode too: a lone request gets nvJPEG's latency; the SMs are idle
        if batch.pixels or (encoded is not None and decoder is not None):
            if self._gpu_normaliser is None:
                raise BackendError("a batch of pixels was left for the GPU, but there is no GPU normaliser")
            normaliser = self._gpu_normaliser
            if normaliser.config != preprocess:  # a new version changed its preprocessing
                # Built aside, then swapped: the decode-ahead thread may be using the old one.
                normaliser = self._gpu_normaliser = GpuNormaliser(
                    preprocess, device=self._settings.device, max_frames=self.max_batch
                )
            if encoded is None or decoder is None:
                [pixels] = batch.inputs.values()
                return normaliser.from_pixels(pixels)
            if decoder.fits(len(encoded), preprocess):
                with decoder.decode(encoded, preprocess) as shared:
                    return normaliser.from_pixels(shared)
            # A reload raised max_batch or the image size past the shared block: decode here this time.
            pixels = np.concatenate([decode_pixels(image, preprocess) for image in encoded])
            return normaliser.from_pixels(pixels)
        if self._gpu_decoder is None or encoded is None:
            raise BackendError("a JPEG batch was left for the GPU decoder, but there is none")
        if self._gpu_decoder.config != preprocess:  # a new version changed its preprocessing
            self._gpu_decoder = GpuJpegDecoder(
                preprocess, device=self._settings.device, max_frames=self.max_batch
            )
        return self._gpu_decoder.decode(encoded)

    def _run(self, loaded: LoadedModel, batch: Batch) -> dict[str, npt.NDArray[Any]]:
        if batch.encoded is None and not batch.pixels:
            return loaded.backend.infer(batch.inputs)
        preprocess = loaded.config.preprocess
        if preprocess is None:
            raise BackendError("a batch was left for GPU preprocessing, but the serving version has none")
        if batch.on_device is not None and batch.prepared_for == preprocess:
            images = batch.on_device
        else:
            images = self._preprocess_on_gpu(batch, preprocess)
        if not loaded.backend.accepts_device_tensors:  # e.g. a reload brought an onnxruntime version
            images = images.cpu().numpy()
        return loaded.backend.infer({preprocess.input: images})

    async def _run_batch(self, loaded: LoadedModel, batch: Batch) -> list[Outputs | RequestError]:
        """Run `batch`; if it fails and holds several requests, split it until only the bad ones fail."""
        loop = asyncio.get_running_loop()
        assert self._infer_pool is not None, "start() makes the pool"
        try:
            raw = await loop.run_in_executor(self._infer_pool, self._run, loaded, batch)
            return list(split_outputs(batch, raw))
        except Exception as exc:
            error = _request_error(exc)
        if len(batch.requests) == 1:
            return [error]
        logger.warning(
            "model %s: batch of %d requests failed (%s); splitting it to find the failing ones",
            self.model,
            len(batch.requests),
            error,
        )
        half = len(batch.requests) // 2
        results: list[Outputs | RequestError] = []
        for part in (batch.requests[:half], batch.requests[half:]):
            self.isolated_runs += 1
            # One shape key, and the frames of the whole: make_batches gives back exactly one batch.
            [sub_batch] = make_batches(part, sum(r.frames for r in part))
            results += await self._run_batch(loaded, sub_batch)
        return results

    async def _infer_stage(self) -> None:
        while True:
            batch = await self._batches.get()
            self._room.set()
            if batch is None:
                break
            self._engine_busy += 1
            try:
                await self._infer_one(batch)
            finally:
                self._engine_busy -= 1
        self._infer_running -= 1
        if self._infer_running == 0:  # the last infer task to end tells the reply stage
            await self._done.put(_STOP)

    async def _infer_one(self, batch: Batch) -> None:
        """Run one batch from the queue and hand its results to the reply stage."""
        kept = await self._drop_expired(batch)
        if kept is None:
            return
        batch = kept
        loaded = self._slot.acquire()
        started = time.time()
        t0 = time.perf_counter()
        try:
            results = await self._run_batch(loaded, batch)
        finally:
            self._slot.release(loaded)
        infer_s = time.perf_counter() - t0
        version = str(loaded.number)
        self._metrics.batch_size.labels(model=self.model, version=version).observe(batch.frames)
        self._metrics.inference.labels(model=self.model, version=version).observe(infer_s)
        for request in batch.requests:
            self._queue_wait.observe(max(0.0, started - request.enqueued_at))
        self.batches_run += 1
        failed = [r for r in results if isinstance(r, RequestError)]
        if failed:
            logger.warning(
                "model %s v%s: %d of %d requests failed: %s",
                self.model,
                version,
                len(failed),
                len(results),
                failed[0],
            )
        await self._done.put(_Done(batch, version, started, infer_s, results))

    async def _drop_expired(self, batch: Batch) -> Batch | None:
        now = time.time()
        keep = []
        for request in batch.requests:
            try:
                check_deadline(request, now)
                keep.append(request)
            except DeadlineExceededError as exc:
                await self._finish(request, exc, version="")
        if not keep:
            return None
        if len(keep) == len(batch.requests):
            return batch
        return make_batches(keep, self.max_batch)[0]  # one shape key in a batch, so one batch back

    # -- reply stage -------------------------------------------------------------------------------

    async def _reply_stage(self) -> None:
        # Durable replies wait for their PubAcks; up to this many batches of them at once, so waiting on
        # the stream never holds up the engine (the infer stage would block on a full reply queue).
        durable: set[asyncio.Task[None]] = set()
        while True:
            done = await self._done.get()
            if done is None:
                break
            pending = []
            for request, result in zip(done.batch.requests, done.results, strict=True):
                if isinstance(result, RequestError):
                    pending.append(self._finish(request, result, version=done.loaded_version))
                else:
                    pending.append(self._reply_ok(request, result, done))
            if any(r.reply_to and r.reply_to.startswith("results.") for r in done.batch.requests):
                task = asyncio.create_task(self._reply_durable(pending))
                durable.add(task)
                task.add_done_callback(durable.discard)
                while len(durable) >= _DURABLE_BATCHES:
                    await asyncio.wait(durable, return_when=asyncio.FIRST_COMPLETED)
            else:
                for step in pending:  # inbox replies only fill the write buffer: no task per reply
                    await step
        if durable:
            await asyncio.wait(durable)

    async def _reply_durable(self, pending: list[Coroutine[Any, Any, None]]) -> None:
        """A batch's durable replies, their PubAcks awaited in parallel."""
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                logger.error("model %s: answering a request failed: %r", self.model, outcome)

    async def _reply_ok(
        self, request: PreparedRequest, outputs: dict[str, npt.NDArray[Any]], done: _Done
    ) -> None:
        now = time.time()
        body = encode_outputs(
            request.request_id,
            self.model,
            done.loaded_version,
            outputs,
            {
                "queue_ms": round(max(0.0, done.started_at - request.enqueued_at) * 1000, 3),
                "infer_ms": round(done.infer_s * 1000, 3),
                "total_ms": round(max(0.0, now - request.enqueued_at) * 1000, 3),
            },
        )
        try:
            await self._publish_reply(request, body, ok=True)
        except RequestError as exc:
            await self._finish(request, exc, version=done.loaded_version)
            return
        await self._act(request, None, version=done.loaded_version)

    async def _publish_reply(self, request: PreparedRequest, body: bytes, *, ok: bool) -> None:
        if request.reply_to is None:
            return
        await publish_reply(self._nc, self._js, request.reply_to, request.request_id, body, ok=ok)

    async def _finish(self, request: PreparedRequest, error: RequestError | None, *, version: str) -> None:
        """Answer an error (if the ack policy says so) and act."""
        decision = decide_ack(
            error,
            deliveries=request.deliveries,
            max_deliver=self._settings.max_deliver,
            nak_delay_s=self._settings.nak_delay_s(request.deliveries),
        )
        if decision.reply_error and error is not None:
            with contextlib.suppress(RequestError):
                await self._publish_reply(
                    request, encode_error(request.request_id, error.code, error.message), ok=False
                )
        if decision.to_dlq and error is not None:
            await self._to_dlq(request, error)
        await self._act(
            request, error, version=version, decision_action=decision.action, delay_s=decision.delay_s
        )

    async def _act(
        self,
        request: PreparedRequest,
        error: RequestError | None,
        *,
        version: str,
        decision_action: AckAction | None = None,
        delay_s: float = 0.0,
    ) -> None:
        msg = request.msg
        action = decision_action or AckAction.ACK
        try:
            if action is AckAction.ACK:
                await msg.ack()
            elif action is AckAction.TERM:
                await msg.term()
            else:
                await msg.nak(delay=delay_s or None)
        except Exception as exc:
            logger.warning("model %s: %s of %s failed: %s", self.model, action.value, request.request_id, exc)
        self._held.pop(id(msg), None)
        self._inflight.set(len(self._held))
        if action is AckAction.NAK:
            return
        answered, duration = self._outcome_series(version, "ok" if error is None else error.code)
        answered.inc()
        duration.observe(max(0.0, time.time() - request.enqueued_at))

    def _outcome_series(self, version: str, status: str) -> tuple[Counter, Histogram]:
        """The request counter and duration histogram of (version, status), looked up once each.

        `labels()` costs more than the observation itself; a worker sees few versions and codes.
        """
        series = self._outcomes.get((version, status))
        if series is None:
            labels = {"model": self.model, "version": version, "status": status}
            series = (
                self._metrics.requests.labels(**labels),
                self._metrics.request_duration.labels(**labels),
            )
            self._outcomes[(version, status)] = series
        return series

    async def _to_dlq(self, request: PreparedRequest, error: RequestError) -> None:
        headers = {k: v for k, v in (request.msg.headers or {}).items() if k != HEADER_MSG_ID}
        headers.update(
            {
                "Jetinfer-Dlq-Reason": error.code,
                "Jetinfer-Dlq-Message": error.message[:512].replace("\r", " ").replace("\n", " "),
                "Jetinfer-Dlq-Deliveries": str(request.deliveries),
                "Jetinfer-Request-Id": request.request_id[:256],
                HEADER_MSG_ID: f"dlq-{request.request_id[:200]}-{request.deliveries}",
            }
        )
        try:
            await self._js.publish(dlq_subject(self.model), request.msg.data, headers=headers, timeout=5)
        except Exception as exc:
            logger.error("model %s: could not copy %s to the DLQ: %s", self.model, request.request_id, exc)

    async def _nak(self, msg: Msg, delay_s: float) -> None:
        try:
            await msg.nak(delay=delay_s or None)
        except Exception as exc:
            logger.warning("model %s: nak failed: %s: %s", self.model, type(exc).__name__, exc)
        self._held.pop(id(msg), None)

    async def _release_unstarted(self, requests: list[PreparedRequest]) -> None:
        await asyncio.gather(*(self._nak(r.msg, 0.0) for r in requests))

    # -- in-progress watchdog ----------------------------------------------------------------------

    async def _progress_watchdog(self) -> None:
        ack_wait = self._settings.ack_wait_s
        while True:
            await asyncio.sleep(max(0.1, ack_wait / 6))
            await self.keep_alive(ack_wait / 3)

    async def keep_alive(self, older_than_s: float) -> int:
        """Send `in_progress` for every held message not touched for `older_than_s`; returns how many."""
        now = time.monotonic()
        entries = list(self._held.values())
        if self._consumer is not None:
            entries += self._consumer.buffered_entries()
        stale = [entry for entry in entries if now - entry.touched > older_than_s]
        for entry in stale:
            entry.touched = now
        if stale:
            await asyncio.gather(*(self._in_progress(entry.msg) for entry in stale))
            self.progress_sent += len(stale)
        return len(stale)

    async def _in_progress(self, msg: Msg) -> None:
        try:
            await msg.in_progress()
        except Exception as exc:
            logger.debug("model %s: in_progress failed: %s", self.model, exc)

    # -- shutdown ----------------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """Stop fetching, finish and answer the batch in flight, nak what never started, within `grace_s`."""
        self._stopping.set()
        self._room.set()
        if self._consumer is not None:
            unstarted = await self._consumer.stop()
            await asyncio.gather(*(self._nak(m, 0.0) for m in unstarted))
        if self._fetch_task is None or self._reply_task is None or self._watchdog_task is None:
            await asyncio.to_thread(self._close_process_decoder)
            return  # never started
        stages = [self._fetch_task, *self._infer_tasks, self._reply_task]
        # Batches waiting for the engine never started: give them back at once. The fetch stage's end
        # markers may be among them already: put them back, or an infer task would wait forever.
        markers = 0
        while not self._batches.empty():
            queued = self._batches.get_nowait()
            if queued is None:
                markers += 1
            else:
                await self._release_unstarted(queued.requests)
        for _ in range(markers):
            self._batches.put_nowait(_STOP)
        try:
            await asyncio.wait_for(asyncio.gather(*stages), grace_s)
        except TimeoutError:
            logger.warning(
                "model %s: in-flight work did not finish within %.1f s; cancelling", self.model, grace_s
            )
            for task in stages:
                task.cancel()
            await asyncio.gather(*stages, return_exceptions=True)
            held = [entry.msg for entry in self._held.values()]
            await asyncio.gather(*(self._nak(m, 0.0) for m in held))
        self._watchdog_task.cancel()
        await asyncio.gather(self._watchdog_task, return_exceptions=True)
        for pool in (self._infer_pool, self._gpu_prep_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._close_process_decoder)
