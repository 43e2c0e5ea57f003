"""A front process: pulls, prepares and answers a worker's requests on a NATS connection of its own, and
has the worker's engine process run their batches.

One nats-py connection's event loop moves about 12k messages a second on the H200 machine, a light
engine takes more, and in one process NATS's work takes the GIL from the threads feeding the GPU
(docs/benchmarks.md, session 10). So `jetinfer serve --fronts K` starts K of these
(`worker.fronts`), each running the pipeline's intake, form (checks and msgpack; images stay encoded)
and settle stages unchanged, with the run stage's runner replaced by `RemoteRunner`: a batch crosses the
link to the engine and its outcomes come back. This process settles every message it took; the engine
never sees one.

It stops on the engine's `Stop` (finishing the batches in flight), and when the engine is gone (its end
of the link closed): then the batches in flight get a retryable error, so their messages are nak'd and
served again by whoever pulls them next. The engine's death kills it anyway (`jetinfer.children`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from jetinfer.cleanup import logged
from jetinfer.connection import connect
from jetinfer.errors import BackendError, JetinferError, RequestError
from jetinfer.repository import ModelConfig

from . import gc_tuning
from .autoconfig import Plan
from .batcher import Batch
from .event_loop import event_loop_factory
from .front_link import (
    BatchDone,
    FrontState,
    Hello,
    Link,
    LinkClosedError,
    MetricsSnapshot,
    RemoteRequest,
    RunBatch,
    Serve,
    Stop,
    WireError,
)
from .metrics import WorkerMetrics
from .pipeline import Pipeline
from .prepare import PreparedRequest
from .preprocess import Preprocessing
from .replies import ReplyRefusals
from .run import BatchRunner, RanBatch
from .settings import WorkerSettings

__all__ = ["FrontPipeline", "KeepEncoded", "RemoteRunner", "main", "metric_families"]

logger = logging.getLogger(__name__)

#: How often a front sends its metrics to the engine's /metrics.
METRICS_EVERY_S = 1.0


class KeepEncoded(Preprocessing):
    """A front's preprocessing: every image crosses to the engine encoded (the engine's strategy decodes)."""

    name = "front"

    def keeps_encoded(self, content_type: str, data: bytes) -> bool:
        """Every image stays encoded."""
        return True

    def describe(self) -> str:
        """What decodes where."""
        return "images sent encoded to the engine process"


def _remote(request: PreparedRequest) -> RemoteRequest:
    return RemoteRequest(
        request.request_id,
        request.enqueued_at,
        request.deadline_s,
        request.frames,
        request.content_type,
        request.encoded,
        request.inputs,
        request.pixels,
    )


class RemoteRunner(BatchRunner):
    """Runs a front's batches of one model on the engine, over the link."""

    def __init__(
        self,
        model: str,
        link: Link,
        pending: dict[int, asyncio.Future[BatchDone]],
        ids: Iterator[int],
        *,
        slots: int,
    ) -> None:
        self.model = model
        self.slots = slots
        self.busy = 0
        self.batches_run = 0
        self.isolated_runs = 0  # counted by the engine, which splits failing batches
        self._link = link
        self._pending = pending
        self._ids = ids

    async def run(self, batch: Batch) -> RanBatch:
        """Send `batch` to the engine and wait for its outcomes (a retryable error if the engine is gone)."""
        batch_id = next(self._ids)
        done: asyncio.Future[BatchDone] = asyncio.get_running_loop().create_future()
        self._pending[batch_id] = done
        self.busy += 1
        try:
            await self._link.send(RunBatch(self.model, batch_id, tuple(_remote(r) for r in batch.requests)))
            outcome = await done
        except LinkClosedError:
            error = BackendError("the worker's engine process is gone; the request is served again")
            return RanBatch(batch, "", time.time(), 0.0, tuple(error for _ in batch.requests))
        finally:
            self._pending.pop(batch_id, None)
            self.busy -= 1
        self.batches_run += 1
        results: tuple[dict[str, Any] | RequestError, ...] = tuple(
            r.error() if isinstance(r, WireError) else r for r in outcome.results
        )
        return RanBatch(batch, outcome.version, outcome.started_at, outcome.infer_s, results)

    def close(self) -> None:
        """Nothing of its own to release (the link is the front's)."""


class FrontPipeline(Pipeline):
    """A model's pipeline in a front process: the engine's plan, config and max_batch, the engine's runner."""

    def __init__(self, serve: Serve, runner: RemoteRunner, **kwargs: Any) -> None:
        super().__init__(model=serve.model, slot=None, **kwargs)
        self._serve = serve
        self._remote = runner

    def update(self, serve: Serve) -> None:
        """Go on with the engine's new version's config (a reload)."""
        self._serve = serve

    @property
    def max_batch(self) -> int:
        """Frames per batch, as the engine runs them."""
        return self._serve.max_batch

    def serving_config(self) -> ModelConfig:
        """The engine's serving version's config."""
        return self._serve.config

    async def _choose(self) -> tuple[Plan, Preprocessing, BatchRunner]:
        return self._serve.plan, KeepEncoded(), self._remote


def metric_families(
    registry: CollectorRegistry,
) -> tuple[tuple[str, str, str, tuple[tuple[str, dict[str, str], float], ...]], ...]:
    """`registry`'s metric families in the link's form."""
    return tuple(
        (
            family.name,
            family.type,
            family.documentation,
            tuple((s.name, dict(s.labels), float(s.value)) for s in family.samples),
        )
        for family in registry.collect()
    )


class Front:
    """One front process's work: serve what the engine says until told to stop or the engine is gone."""

    def __init__(self, link: Link, hello: Hello) -> None:
        self.settings: WorkerSettings = hello.settings
        self.number = hello.front
        self._link = link
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self._refusals = ReplyRefusals()
        self._pending: dict[int, asyncio.Future[BatchDone]] = {}
        self._batch_ids = itertools.count(1)  # one numbering for all models: one link
        self._pipelines: dict[str, FrontPipeline] = {}
        self._nc: NatsClient | None = None
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")
        self._stop: asyncio.Future[float] | None = None
        self._engine_gone = False

    def _stop_within(self, grace_s: float) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(grace_s)

    async def run(self) -> int:
        """Serve until stopped; the exit status (1: a pipeline failed)."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_within, self.settings.grace_period_s)
        self._nc = await connect(
            self.settings,
            name=f"jetinfer-worker-{self.settings.worker_id}-front{self.number}",
            reconnected_cb=self._on_reconnect,
            disconnected_cb=self._on_disconnect,
            error_cb=self._refusals.on_error,
        )
        await self._say_state()
        if self.settings.gc_threshold:  # as the engine does: what start-up made stays out of collections
            gc_tuning.freeze_startup_heap()
        reading = asyncio.create_task(self._read(), name="front-link")
        reporting = asyncio.create_task(self._report(), name="front-metrics")
        grace_s = await self._stop
        status = 1 if any(p.failed for p in self._pipelines.values()) else 0
        await self._shut_down(grace_s)
        reporting.cancel()
        reading.cancel()
        await asyncio.gather(reading, reporting, return_exceptions=True)
        return status

    async def _shut_down(self, grace_s: float) -> None:
        await asyncio.gather(*(p.stop(grace_s) for p in self._pipelines.values()))
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), max(1.0, grace_s / 4))
            except Exception as exc:
                logger.warning("front %d: drain failed (%s); closing", self.number, exc)
                await logged(logger, "closing the NATS connection", self._nc.close())
        if not self._engine_gone:
            with contextlib.suppress(LinkClosedError):  # the engine went meanwhile: nobody left to read them
                await self._link.send(MetricsSnapshot(metric_families(self.registry)))
        await self._link.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    async def _read(self) -> None:
        try:
            while True:
                message = await self._link.receive()
                if isinstance(message, BatchDone):
                    done = self._pending.get(message.batch_id)
                    if done is not None and not done.done():
                        done.set_result(message)
                elif isinstance(message, Serve):
                    await self._serve(message)
                elif isinstance(message, Stop):
                    self._stop_within(message.grace_s)
        except LinkClosedError:
            if self._stop is not None and self._stop.done():
                return  # this front closed the link itself, stopping
            self._engine_gone = True
            logger.error("front %d: the engine process is gone; giving back what it holds", self.number)
            for done in self._pending.values():
                if not done.done():
                    done.set_exception(LinkClosedError("the engine process is gone"))
            self._stop_within(min(5.0, self.settings.grace_period_s))

    async def _serve(self, serve: Serve) -> None:
        pipeline = self._pipelines.get(serve.model)
        if pipeline is not None:
            pipeline.update(serve)
            return
        assert self._nc is not None
        pipeline = FrontPipeline(
            serve,
            # As many batches at the engine as an in-process pipeline has there: those made ahead, and
            # the one running (the engine takes at most that many of all its fronts' at once).
            RemoteRunner(
                serve.model,
                self._link,
                self._pending,
                self._batch_ids,
                slots=serve.plan.pipeline_depth + 1,
            ),
            nc=self._nc,
            js=self._nc.jetstream(),
            settings=self.settings,
            metrics=self.metrics,
            decode_pool=self._decode_pool,
            refusals=self._refusals,
        )
        task = await pipeline.start()
        task.add_done_callback(self._on_pipeline_done)
        self._pipelines[serve.model] = pipeline
        await self._say_state()

    def _on_pipeline_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._stop_within(self.settings.grace_period_s)  # logged by the pipeline; this front exits 1

    async def _say_state(self) -> None:
        connected = self._nc is not None and self._nc.is_connected
        with contextlib.suppress(LinkClosedError):  # the reader sees the engine gone and stops this front
            await self._link.send(FrontState(connected, tuple(self._pipelines)))

    async def _on_reconnect(self) -> None:
        await self._say_state()
        for pipeline in self._pipelines.values():
            await pipeline.on_reconnect()

    async def _on_disconnect(self) -> None:
        await self._say_state()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(METRICS_EVERY_S)
            try:
                await self._link.send(MetricsSnapshot(metric_families(self.registry)))
            except LinkClosedError:
                return


async def _main(fd: int) -> int:
    link = await Link.open(socket.socket(fileno=fd))
    hello = await link.receive()
    if not isinstance(hello, Hello):
        raise LinkClosedError(f"expected the engine's hello, got {type(hello).__name__}")
    logging.basicConfig(
        level=hello.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s [front {hello.front}]: %(message)s",
        stream=sys.stderr,
    )
    gc_tuning.clock.install()
    gc_tuning.tune(hello.settings.gc_threshold)
    return await Front(link, hello).run()


def main(argv: list[str] | None = None) -> int:
    """`python -m jetinfer.worker.front FD`: the front process, on its end of the link (file FD)."""
    args = sys.argv[1:] if argv is None else argv
    fd = int(args[0])
    choice = args[1] if len(args) > 1 else "auto"
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(choice)) as runner:
            return runner.run(_main(fd))
    except (JetinferError, ConnectionError, TimeoutError) as exc:  # the link's end among them
        print(f"jetinfer front: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
