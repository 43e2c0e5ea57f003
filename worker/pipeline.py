"""One model's serving pipeline: its stages, connected by bounded queues in one task group.

::

    intake ─▶ form: prepare → decode on the CPU (the strategy's) → batches ─┬─ made ahead on the GPU
           ─▶ [batches: pipeline_depth] ─▶ run (one task per batch slot) ─▶ [ran] ─▶ settle
    settle, beside them: confirming inbox replies; in_progress for every message held

Forming batch N+1 overlaps running batch N, and batch N is answered while N+1 runs. A batch is
formed only when it can be queued: under load requests keep arriving in the intake's buffer while
the engine is busy, so batches fill; a lone request at idle goes at once. On a GPU, a batch queued
behind a busy engine is made into the model's input meanwhile (in one of the strategy's lanes), and
the run stage takes whichever queued batch is made first (`ReadyQueue`: lanes differ in speed).
What the worker chose for all this is its plan (`autoconfig`), logged once per model. A stage that
fails with a bug fails the pipeline (`failed`), and the worker stops rather than serve half a pipeline.

Shutdown, in order, within the grace period: stop fetching (what the intake buffered is given
back), give back the batches that never started, let the batches in flight finish and be
answered, confirm the last replies; past the grace period, cancel and give back what is still held.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from jetinfer.errors import BackendError
from jetinfer.repository import ModelConfig
from jetinfer.streams import INFER_STREAM, consumer_name

from .autoconfig import Plan, Rates, plan, probe_rates
from .batcher import Batch
from .forming import BatchFormer
from .intake import Intake, PullConsumer, pull_max_bytes
from .metrics import WorkerMetrics
from .preprocess import Preprocessing, choose_preprocessing
from .ready_queue import ReadyQueue
from .reload import ModelSlot
from .replies import ReplyRefusals
from .run import BatchRunner, RanBatch, Runner
from .settings import WorkerSettings
from .settle import Settler
from .stage_clock import StageClock

__all__ = ["Pipeline", "Queued", "choose_engine", "probe_engine"]

logger = logging.getLogger(__name__)

#: A batch waiting for the engine: as formed, or being made into the model's input ahead of its turn.
Queued = Batch | asyncio.Future[Batch]


async def probe_engine(slot: ModelSlot, settings: WorkerSettings, max_batch: int) -> Rates | None:
    """The engine's and the decoders' images/s for an image model on a GPU, measured where the plan
    uses them (whether the decoding processes keep up with the engine); None where `--gpu-decode-lanes`
    fixes the lanes, or for any other model."""
    current = slot.current
    assert current is not None, "a model is probed once it has a version"
    on_gpu = current.backend.accepts_device_tensors
    if not on_gpu or current.config.preprocess is None or settings.gpu_decode_lanes is not None:
        return None
    return await asyncio.to_thread(
        probe_rates,
        current.backend,
        current.config,
        max_batch,
        hardware=settings.nvimgcodec,
        device=settings.device,
    )


async def choose_engine(
    model: str,
    slot: ModelSlot,
    settings: WorkerSettings,
    metrics: WorkerMetrics,
    *,
    cores: tuple[int, str],
    max_batch: int,
    rates: Rates | None = None,
) -> tuple[Plan, Preprocessing, Runner]:
    """The plan, the preprocessing and the runner of `model` on this process's backend, for its serving
    version (probing the GPU's rates where the plan depends on them and `rates` are not given)."""
    current = slot.current
    assert current is not None, "a model is run once it has a version"
    count, why = cores
    on_gpu = current.backend.accepts_device_tensors
    if rates is None:
        rates = await probe_engine(slot, settings, max_batch)
    the_plan = plan(settings, current.config, on_gpu=on_gpu, cores=count, cores_why=why, rates=rates)
    if the_plan.gil_switch_ms:
        sys.setswitchinterval(
            the_plan.gil_switch_ms / 1000.0
        )  # process-wide: the GPU's feeders get it sooner
    preprocessing = await asyncio.to_thread(
        choose_preprocessing, the_plan, settings, current.config, max_batch
    )
    # Decided once: a later version with fewer slots serialises on its own lock.
    slots = 1 if preprocessing.on_gpu else current.backend.batch_slots
    runner = Runner(model, slot, preprocessing, metrics, slots=slots, max_batch=max_batch)
    return the_plan, preprocessing, runner


class Pipeline:
    """Serves one model from its consumer `worker-<model>` until stopped."""

    def __init__(
        self,
        *,
        model: str,
        nc: NatsClient,
        js: JetStreamContext,
        settings: WorkerSettings,
        slot: ModelSlot | None,
        metrics: WorkerMetrics,
        decode_pool: ThreadPoolExecutor,
        refusals: ReplyRefusals,
        cores: tuple[int, str] = (1, "default"),
        intake: Intake | None = None,
        rates: Rates | None = None,
    ) -> None:
        self._rates = rates
        self.model = model
        self._nc = nc
        self._settings = settings
        self._slot = slot
        self._metrics = metrics
        self._decode_pool = decode_pool
        self.settler = Settler(model, nc, js, settings, metrics, refusals)
        self._clock = StageClock(metrics, model)
        self.intake: Intake = intake or PullConsumer(
            nc,
            INFER_STREAM,
            consumer_name(model),
            capacity=1,
            heartbeat_s=settings.heartbeat_s,
            max_bytes=pull_max_bytes(settings.max_msg_size_bytes),
        )
        self._cores = cores
        self.plan: Plan | None = None
        self._preprocessing: Preprocessing | None = None
        self._runner: BatchRunner | None = None
        self._former: BatchFormer | None = None
        self._batches: ReadyQueue[Batch] = ReadyQueue(maxsize=1)
        self._ran: asyncio.Queue[RanBatch | None] = asyncio.Queue(maxsize=1)
        self._room = asyncio.Event()  # set when a run task takes a batch: room to form the next
        self._stopping = asyncio.Event()
        self._running = 0  # run tasks not finished
        self._task: asyncio.Task[None] | None = None

    @property
    def max_batch(self) -> int:
        """Frames per batch: the setting, capped by the serving version's config."""
        return self._slot.max_batch(self._settings.max_batch) if self._slot is not None else 1

    @property
    def batch_slots(self) -> int:
        """Batches that run at once."""
        return self._runner.slots if self._runner is not None else 1

    @property
    def batches_run(self) -> int:
        """Batches run so far."""
        return self._runner.batches_run if self._runner is not None else 0

    @property
    def isolated_runs(self) -> int:
        """Re-runs of parts of failed batches (to find the failing requests)."""
        return self._runner.isolated_runs if self._runner is not None else 0

    @property
    def progress_sent(self) -> int:
        """in_progress signals sent."""
        return self.settler.progress_sent

    @property
    def failed(self) -> BaseException | None:
        """The bug that ended the pipeline, if one did."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def serving_config(self) -> ModelConfig:
        """The serving version's config (what requests are checked and batched against)."""
        current = self._slot.current if self._slot is not None else None
        assert current is not None, "a serving model keeps a version"
        return current.config

    async def _choose(self) -> tuple[Plan, Preprocessing, BatchRunner]:
        """The plan, the preprocessing and the runner, for the serving version on this process's backend."""
        assert self._slot is not None, "a pipeline that runs its own batches has a model slot"
        return await choose_engine(
            self.model,
            self._slot,
            self._settings,
            self._metrics,
            cores=self._cores,
            max_batch=self.max_batch,
            rates=self._rates,
        )

    async def start(self) -> asyncio.Task[None]:
        """Choose the plan, the preprocessing and the runner, start pulling and the stages; returns the
        pipeline's task."""
        the_plan, preprocessing, runner = await self._choose()
        self.plan, self._preprocessing, self._runner = the_plan, preprocessing, runner
        self._batches = ReadyQueue(maxsize=the_plan.pipeline_depth)
        self._ran = asyncio.Queue(maxsize=the_plan.pipeline_depth)
        slots = runner.slots
        self._former = BatchFormer.of(
            preprocessing, self._decode_pool, threads=the_plan.decode_threads, settings=self._settings
        )
        self.intake.capacity = self.max_batch * self._settings.fetch_batches
        await self.intake.start()
        self._running = slots
        self._task = asyncio.create_task(self._run(slots), name=f"pipeline-{self.model}")
        logger.info(
            "model %s: serving from consumer %s (max_batch=%d, batches at once=%d; %s; chosen from: %s)",
            self.model,
            consumer_name(self.model),
            self.max_batch,
            slots,
            preprocessing.describe(),
            the_plan.describe(),
        )
        return self._task

    async def _run(self, slots: int) -> None:
        try:
            await self._run_stages(slots)
        except Exception:
            logger.critical("model %s: the pipeline failed; the worker stops", self.model, exc_info=True)
            raise

    async def _run_stages(self, slots: int) -> None:
        settler = self.settler
        async with asyncio.TaskGroup() as group:
            beside = [
                group.create_task(
                    settler.run_keepalive(self.intake.buffered_entries), name=f"keepalive-{self.model}"
                ),
                group.create_task(settler.run_confirmations(), name=f"confirm-{self.model}"),
            ]
            stages = [
                group.create_task(self._form_stage(), name=f"form-{self.model}"),
                *(group.create_task(self._run_stage(), name=f"run-{self.model}-{i}") for i in range(slots)),
                group.create_task(self._settle_stage(), name=f"settle-{self.model}"),
            ]
            await asyncio.wait(stages)
            for task in beside:
                task.cancel()

    # -- the stages ----------------------------------------------------------------------------------

    async def _form_stage(self) -> None:
        assert self._preprocessing is not None, "start() chooses it"
        assert self._runner is not None, "start() makes it"
        assert self._former is not None, "start() makes it"
        timing = self._clock.timing
        while not self._stopping.is_set():
            with timing("form", "waiting_for_room"):
                while self._batches.full() and not self._stopping.is_set():
                    self._room.clear()
                    await self._room.wait()
            if self._stopping.is_set():
                break
            with timing("form", "waiting_for_requests"):
                deliveries = await self.intake.get(self.max_batch, self._settings.max_wait_ms / 1000.0)
            if not deliveries:
                continue
            self.settler.hold(deliveries)
            msgs = [delivery.msg for delivery in deliveries]
            config = self.serving_config()
            try:
                with timing("form", "forming"):
                    batches, rejected = await self._former.form(msgs, config, self.max_batch)
            except Exception as exc:  # a bug in preparation must not lose the messages
                logger.exception("model %s: preparing %d requests failed", self.model, len(msgs))
                await self.settler.preparation_failed(msgs, exc)
                continue
            for request in rejected:
                assert request.error is not None
                await self.settler.fail(request, request.error)
            for batch in batches:
                if self._stopping.is_set():
                    await self.settler.give_back([r.msg for r in batch.requests])
                    continue
                engine_busy = self._runner.busy > 0 or not self._batches.empty()
                queued: Queued = batch
                if engine_busy and self._preprocessing.wants_ahead(batch):
                    # Made into the model's input in a lane while the batches ahead of it run.
                    queued = asyncio.ensure_future(self._preprocessing.ahead(batch, config))
                with timing("form", "waiting_for_room"):
                    await self._batches.put(queued)
        for _ in range(self.batch_slots):  # one end marker per run task
            await self._batches.put(None)

    async def _run_stage(self) -> None:
        assert self._runner is not None
        timing = self._clock.timing
        while True:
            with timing("run", "waiting_for_batch"):
                await self._batches.wait_for_entry()
            with timing("run", "waiting_for_making"):  # where every queued batch is still being made
                queued = await self._batches.get()
            if queued is None:
                break
            self._room.set()
            batch = queued if isinstance(queued, Batch) else await queued  # made (or failed) by now
            try:
                with timing("run", "running"):
                    ran = await self._runner.run(batch)
            except Exception as exc:  # a bug in running: the batch's requests are retried, not lost
                logger.exception("model %s: running a batch of %d failed", self.model, len(batch.requests))
                error = BackendError(f"running the batch failed: {type(exc).__name__}: {exc}")
                ran = RanBatch(batch, "", time.time(), 0.0, tuple(error for _ in batch.requests))
            with timing("run", "waiting_to_settle"):
                await self._ran.put(ran)
        self._room.set()
        self._running -= 1
        if self._running == 0:  # the last run task to end tells the settle stage
            await self._ran.put(None)

    async def _settle_stage(self) -> None:
        timing = self._clock.timing
        while True:
            with timing("settle", "waiting_for_batch"):
                ran = await self._ran.get()
            if ran is None:
                break
            with timing("settle", "settling"):
                await self.settler.answer(ran)
        await self.settler.drain()

    # -- control -------------------------------------------------------------------------------------

    async def on_reconnect(self) -> None:
        """After a reconnect, outstanding pulls may be gone: ask again."""
        await self.intake.renew()

    async def stop(self, grace_s: float) -> None:
        """Stop fetching, finish and answer the batches in flight, give back the rest, within `grace_s`."""
        self._stopping.set()
        self._room.set()
        await self.settler.give_back(await self.intake.stop())
        if self._task is not None and not self._task.done():
            # Batches waiting for the engine never started: give them back at once. End markers may be
            # among them already: put them back, or a run task would wait forever.
            markers = 0
            while not self._batches.empty():
                queued = self._batches.get_nowait()
                if queued is None:
                    markers += 1
                else:
                    batch = queued if isinstance(queued, Batch) else await queued
                    await self.settler.give_back([r.msg for r in batch.requests])
            for _ in range(markers):
                self._batches.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            except TimeoutError:
                logger.warning(
                    "model %s: in-flight work did not finish within %.1f s; cancelling", self.model, grace_s
                )
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                await self.settler.give_back(self.settler.held_messages())
            except Exception:  # the pipeline failed (logged as it did): what it held goes back
                await self.settler.give_back(self.settler.held_messages())
        if self._runner is not None:
            self._runner.close()
        if self._preprocessing is not None:
            await asyncio.to_thread(self._preprocessing.close)
