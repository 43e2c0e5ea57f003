"""The worker process: connect, register models, load them, serve, reload, report, and shut down in order.

Shutdown order (SIGTERM or `stop()`): stop fetching, let the batches in flight finish and be
answered, nak what never started, cancel background tasks, unsubscribe, drain the connection,
close the models; all of it within the grace period (a few seconds of it are kept for the drain).

Requests that ran out of deliveries without an answer (their worker died on the last one) are
moved to the DLQ and answered by `worker.advisories.DeadLetters`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from jetinfer.cleanup import logged
from jetinfer.connection import connect
from jetinfer.errors import SettingsError
from jetinfer.repository import ModelRepository
from jetinfer.streams import (
    INFER_STREAM,
    consumer_name,
    ensure_consumer,
    ensure_streams,
    infer_subject,
    register_model,
    reload_subject,
)

from .advisories import DeadLetters
from .autoconfig import Rates, usable_cores
from .backends import cuda
from .backends.base import BackendFactory, BackendOptions, load_backend
from .fronts import EngineModel, Fronts, MergedRegistry, front_count
from .health import HealthServer
from .limits import warn_about_server_limits
from .metrics import GpuProbe, WorkerMetrics
from .pipeline import Pipeline, probe_engine
from .reload import ModelSlot
from .replies import ReplyRefusals
from .reply_policy import ReplyPolicy
from .settings import WorkerSettings

__all__ = ["Worker"]

logger = logging.getLogger(__name__)


class Worker:
    """Serves every configured model from one NATS connection."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        registry: CollectorRegistry | None = None,
        backend_factory: BackendFactory = load_backend,
    ) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.cores = usable_cores()  # (count, why): what the process may use, not the node's os.cpu_count()
        self.models = list(settings.model) or ModelRepository(settings.repository).models()
        if not self.models:
            raise SettingsError(
                "model",
                f"no models found in {settings.repository}"
                + ("" if settings.repository.is_dir() else " (the folder does not exist)")
                + "; give --model NAME (the worker then waits for its first version) or export one with "
                "`jetinfer export-demo`",
            )
        self.slots = {
            m: ModelSlot(
                m,
                settings.repository,
                metrics=self.metrics,
                options=self._backend_options(),
                backend_factory=backend_factory,
            )
            for m in self.models
        }
        self.servers: dict[str, Pipeline] = {}
        #: With front processes (`--fronts`): each model's engine, and the fronts that feed them.
        self.engines: dict[str, EngineModel] = {}
        self.fronts: Fronts | None = None
        self._front_count: int | None = None  # chosen with the first model served
        self._sent_versions: dict[str, int] = {}
        self.failed = asyncio.Event()  # a pipeline failed: the worker must stop
        self._refusals = ReplyRefusals()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._decode_pool = ThreadPoolExecutor(
            max_workers=settings.decode_workers or self.cores[0], thread_name_prefix="decode"
        )
        self._subscriptions: list[Subscription] = []
        self._background: list[asyncio.Task[None]] = []
        self._health: HealthServer | None = None
        self._gpu = GpuProbe()
        self._stopped = False
        self._start_lock = asyncio.Lock()
        self.dead_letters: DeadLetters | None = None

    def _backend_options(self) -> BackendOptions:
        """The settings' backend options, with ONNX Runtime's threads sized to this process's cores."""
        options = self.settings.backend_options()
        if options.intra_op_threads:
            return options
        threads = max(1, self.cores[0] // max(1, options.parallel_batches))
        return dataclasses.replace(options, intra_op_threads=threads)

    @property
    def health_port(self) -> int | None:
        """The port of /metrics, /healthz and /readyz (None when disabled)."""
        return self._health.port if self._health else None

    def serves(self, model: str) -> bool:
        """Whether `model` is being served (in this process, or through the front processes)."""
        return model in self.servers or model in self.engines

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when connected to NATS, every model has a loaded version and every front is connected."""
        connected = self._nc is not None and self._nc.is_connected
        models = {m: slot.describe() for m, slot in self.slots.items()}
        ready = connected and all(slot.ready for slot in self.slots.values()) and not self._stopped
        details: dict[str, Any] = {"connected": connected, "models": models}
        if self.fronts is not None:
            ready = ready and self.fronts.ready()
            details["fronts"] = self.fronts.describe()
        return ready, details

    def _front_families(self) -> list[tuple[Any, ...]]:
        return list(self.fronts.families()) if self.fronts is not None else []

    async def start(self) -> None:
        """Connect, create streams and consumers, load models and start serving."""
        if self.settings.metrics_port:
            self._health = HealthServer(
                MergedRegistry(self.registry, self._front_families),
                self.readiness,
                host=self.settings.metrics_host,
                port=self.settings.metrics_port,
            )
            await self._health.start()
        self._nc = await connect(
            self.settings,
            name=f"jetinfer-worker-{self.settings.worker_id}",
            reconnected_cb=self._on_reconnect,
            error_cb=self._refusals.on_error,
        )
        self._js = self._nc.jetstream()
        warn_about_server_limits(self._nc.max_payload, self.settings)
        await ensure_streams(self._js, self.settings)
        for model in self.models:
            self._subscriptions.append(
                await self._nc.subscribe(reload_subject(model), cb=self._on_reload_signal)
            )
        self.dead_letters = DeadLetters(
            self._nc,
            self._js,
            self.models,
            self.settings,
            reply_policy=ReplyPolicy.of(self.settings.reply_prefixes, self.settings.nats_inbox_prefix),
        )
        await self.dead_letters.start()
        if not self.settings.repository.is_dir():
            logger.warning(
                "repository folder %s does not exist (yet): waiting for it (a sidecar may create it)",
                self.settings.repository,
            )
        for model in self.models:
            await self.slots[model].refresh()
            await self._ensure_serving(model)
            if not self.serves(model):
                # Registered only once loadable: until then clients get unknown_model at once.
                logger.warning(
                    "model %s: waiting for a loadable version in %s before registering %s (requests get "
                    "unknown_model until then); looking again on its reload signal%s",
                    model,
                    self.settings.repository / model,
                    infer_subject(model),
                    f" and every {self.settings.reload_poll_s:g} s" if self.settings.reload_poll_s else "",
                )
        if self.settings.reload_poll_s > 0:
            self._background.append(asyncio.create_task(self._poll_repository(), name="reload-poll"))
        self._background.append(asyncio.create_task(self._poll_lag(), name="lag-poll"))

    async def _ensure_serving(self, model: str) -> None:
        """Register `model` (its subject and consumer) and serve it, once a version of it is loaded."""
        async with self._start_lock:
            if model in self.engines:
                await self._tell_fronts(model)  # a reload may have changed the config
                return
            if model in self.servers or not self.slots[model].ready or self._stopped:
                return
            assert self._nc is not None
            assert self._js is not None
            await register_model(self._js, model, self.settings)
            await ensure_consumer(self._js, model, self.settings)
            wanted, rates = await self._fronts_wanted(model)
            if wanted:
                await self._serve_through_fronts(model, rates)
                return
            server = Pipeline(
                model=model,
                nc=self._nc,
                js=self._js,
                settings=self.settings,
                slot=self.slots[model],
                metrics=self.metrics,
                decode_pool=self._decode_pool,
                refusals=self._refusals,
                cores=self.cores,
                rates=rates,
            )
            task = await server.start()
            task.add_done_callback(self._on_pipeline_done)
            self.servers[model] = server

    async def _fronts_wanted(self, model: str) -> tuple[bool, Rates | None]:
        """Whether this worker serves through front processes (decided at its first model, then kept),
        and the engine's rates where measured then (the plan's, measured once for both)."""
        rates = None
        if self._front_count is None:
            slot = self.slots[model]
            current = slot.current
            assert current is not None, "a model is served once it has a version"
            rates = await probe_engine(slot, self.settings, slot.max_batch(self.settings.max_batch))
            self._front_count, why = front_count(
                self.settings,
                image_model_on_gpu=current.backend.accepts_device_tensors
                and current.config.preprocess is not None,
                cores=self.cores[0],
                engine_rate=rates.engine if rates is not None else None,
            )
            logger.info("front processes: %d (%s)", self._front_count, why)
        return self._front_count > 0, rates

    async def _serve_through_fronts(self, model: str, rates: Rates | None) -> None:
        assert self._front_count
        count, why = self.cores
        fronts = self._front_count
        cores = (max(1, count - (fronts - 1)), f"{why}, {fronts - 1} left to the front processes")
        engine = EngineModel(
            model, self.slots[model], self.settings, self.metrics, self._decode_pool, cores, rates
        )
        await engine.start()
        self.engines[model] = engine
        if self.fronts is None:
            self.fronts = Fronts(
                self.settings, fronts, self.engines, self.failed.set, self.metrics.front_restarts
            )
            await self.fronts.start()
        await self._tell_fronts(model)

    async def _tell_fronts(self, model: str) -> None:
        """Send the fronts the serving version's config, once per version."""
        current = self.slots[model].current
        if self.fronts is None or current is None or self._sent_versions.get(model) == current.number:
            return
        await self.fronts.serve(self.engines[model].serve_message())
        self._sent_versions[model] = current.number

    def _on_pipeline_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failed.set()  # the pipeline logged its failure; serve() stops the worker

    async def _on_reconnect(self) -> None:
        for server in self.servers.values():
            await server.on_reconnect()

    async def _on_reload_signal(self, msg: Msg) -> None:
        model = msg.subject.rsplit(".", 1)[-1]
        slot = self.slots.get(model)
        if slot is None:
            return
        result = await slot.refresh()
        await self._ensure_serving(model)
        if msg.reply:
            answer = {
                "worker": self.settings.worker_id,
                "model": model,
                "status": result.status,
                "version": result.version,
                "message": result.message,
            }
            await logged(
                logger, f"answering the reload signal of {model}", msg.respond(json.dumps(answer).encode())
            )

    async def _poll_repository(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            for model, slot in self.slots.items():
                try:
                    await slot.refresh()
                    await self._ensure_serving(model)
                except Exception:
                    logger.exception("model %s: repository poll failed", model)

    async def _poll_lag(self) -> None:
        while True:
            try:
                await self.update_lag()
                if self._gpu.available:
                    await asyncio.to_thread(self._gpu.update, self.metrics)
            except Exception as exc:
                logger.debug("lag poll failed: %s", exc)
            await self.sweep_dead_letters()
            await asyncio.sleep(self.settings.lag_poll_s)

    async def update_lag(self) -> None:
        """Read consumer lag (num_pending + num_ack_pending) and the oldest request's age from the server."""
        assert self._js is not None
        for model in self.models:
            try:
                info = await self._js.consumer_info(INFER_STREAM, consumer_name(model))
            except NotFoundError:  # not registered yet: nobody has served a version of it
                continue
            lag = (info.num_pending or 0) + (info.num_ack_pending or 0)
            self.metrics.consumer_lag.labels(model=model).set(lag)
            age = 0.0
            if lag:
                try:
                    oldest = await self._js.get_msg(
                        INFER_STREAM, seq=1, next=True, subject=infer_subject(model)
                    )
                    if oldest.time is not None:
                        age = max(0.0, time.time() - oldest.time.timestamp())
                except Exception as exc:
                    logger.debug("oldest request of %s unknown: %s", model, exc)
            self.metrics.oldest_request_age.labels(model=model).set(age)

    async def sweep_dead_letters(self) -> int:
        """Bury requests that ran out of deliveries while no worker heard the advisory (see advisories)."""
        if self.dead_letters is None or self._stopped:
            return 0
        buried = 0
        for model in self.models:
            try:
                buried += await self.dead_letters.sweep(model)
            except Exception as exc:
                logger.debug("dead-letter sweep of %s failed: %s", model, exc)
        return buried

    async def stop(self) -> None:
        """Graceful shutdown in the fixed order, within the grace period. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + self.settings.grace_period_s
        # Keep a little of the grace period for draining the connection (acks and replies still buffered).
        drain_reserve = min(3.0, self.settings.grace_period_s / 4)
        grace = self.settings.grace_period_s - drain_reserve
        if self.fronts is not None:
            await self.fronts.stop(grace)
        await asyncio.gather(*(server.stop(grace) for server in self.servers.values()))
        if self.dead_letters is not None:
            await self.dead_letters.stop()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for sub in self._subscriptions:
            await logged(logger, f"unsubscribing from {sub.subject}", sub.unsubscribe())
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), max(0.5, deadline - time.monotonic()))
            except Exception as exc:
                logger.warning("drain failed (%s); closing", exc)
                await logged(logger, "closing the NATS connection", self._nc.close())
        if self._health is not None:
            await self._health.close()
        for engine in self.engines.values():
            await asyncio.to_thread(engine.close)
        for slot in self.slots.values():
            await asyncio.to_thread(slot.close)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        cuda.shutdown_staging()  # idle staging threads would otherwise look like work still running
        logger.info("worker stopped")

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
