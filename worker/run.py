"""Run: one batch on the serving version's backend, in an inference thread, into one outcome per request.

Requests whose deadline passed while they waited are not run (their outcome is the error). A batch
that fails is split in halves, recursively, so a poison request fails alone (in about 2·log2(batch)
runs) and its batch-mates are answered. Up to `slots` batches run at once: one on a GPU, more where
the backend shares the CPU's cores among them (`--parallel-batches`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from jetinfer.errors import BackendError, DeadlineExceededError, RequestError

from .batcher import Batch, make_batches, split_outputs
from .metrics import WorkerMetrics
from .prepare import check_deadline
from .preprocess import Preprocessing
from .reload import LoadedModel, ModelSlot

__all__ = ["BatchRunner", "Outputs", "RanBatch", "Runner"]

logger = logging.getLogger(__name__)

#: One request's outputs, by name.
Outputs = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class RanBatch:
    """A batch after the run stage: per request (in order), its outputs or the error that ended it."""

    batch: Batch
    version: str  # "" where nothing ran (every request expired)
    started_at: float  # epoch seconds
    infer_s: float
    results: tuple[Outputs | RequestError, ...]


class BatchRunner(Protocol):
    """What the run stage runs its batches with: a `Runner` here, or a front process's link to its engine."""

    slots: int  # batches that run at once
    busy: int  # batches running now
    batches_run: int
    isolated_runs: int

    async def run(self, batch: Batch) -> RanBatch:
        """Run `batch` and return every request's outcome."""

    def close(self) -> None:
        """Release what running holds."""


def _request_error(exc: BaseException) -> RequestError:
    if isinstance(exc, RequestError):
        return exc.detached()
    return BackendError(f"{type(exc).__name__}: {exc}")


class Runner:
    """Runs one model's batches on its `ModelSlot`, with the model input made by `preprocessing`."""

    def __init__(
        self,
        model: str,
        slot: ModelSlot,
        preprocessing: Preprocessing,
        metrics: WorkerMetrics,
        *,
        slots: int,
        max_batch: int,
    ) -> None:
        self.model = model
        self.slots = slots
        self._slot = slot
        self._preprocessing = preprocessing
        self._metrics = metrics
        self._max_batch = max_batch
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix=f"infer-{model}")
        self._queue_wait = metrics.queue_wait.labels(model=model)
        self.busy = 0  # batches running now
        self.batches_run = 0
        self.isolated_runs = 0  # re-runs of parts of a failed batch

    async def run(self, batch: Batch) -> RanBatch:
        """Run `batch` (less its expired requests) and return every request's outcome."""
        now = time.time()
        expired: dict[int, RequestError] = {}
        for index, request in enumerate(batch.requests):
            try:
                check_deadline(request, now)
            except DeadlineExceededError as exc:
                expired[index] = exc.detached()
        if len(expired) == len(batch.requests):
            return RanBatch(batch, "", now, 0.0, tuple(expired[i] for i in range(len(batch.requests))))
        live = batch
        if expired:  # one shape key in a batch, so one batch back
            [live] = make_batches(
                [r for i, r in enumerate(batch.requests) if i not in expired], self._max_batch
            )
        self.busy += 1
        loaded = self._slot.acquire()
        started, t0 = time.time(), time.perf_counter()
        try:
            ran = iter(await self._run_splitting(loaded, live))
        finally:
            self._slot.release(loaded)
            self.busy -= 1
        infer_s = time.perf_counter() - t0
        version = str(loaded.number)
        self._metrics.batch_size.labels(model=self.model, version=version).observe(live.frames)
        self._metrics.inference.labels(model=self.model, version=version).observe(infer_s)
        for request in live.requests:
            self._queue_wait.observe(max(0.0, started - request.enqueued_at))
        self.batches_run += 1
        results = tuple(expired[i] if i in expired else next(ran) for i in range(len(batch.requests)))
        failed = [
            r for r in results if isinstance(r, RequestError) and not isinstance(r, DeadlineExceededError)
        ]
        if failed:
            logger.warning(
                "model %s v%s: %d of %d requests failed: %s",
                self.model,
                version,
                len(failed),
                len(results),
                failed[0],
            )
        return RanBatch(batch, version, started, infer_s, results)

    def _infer(self, loaded: LoadedModel, batch: Batch) -> Outputs:
        return loaded.backend.infer(self._preprocessing.model_inputs(batch, loaded))

    async def _run_splitting(self, loaded: LoadedModel, batch: Batch) -> list[Outputs | RequestError]:
        """Run `batch`; if it fails and holds several requests, split it until only the bad ones fail."""
        loop = asyncio.get_running_loop()
        try:
            raw = await loop.run_in_executor(self._pool, self._infer, loaded, batch)
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
            results += await self._run_splitting(loaded, sub_batch)
        return results

    def close(self) -> None:
        """Stop the inference threads (a batch still running finishes in its thread)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
