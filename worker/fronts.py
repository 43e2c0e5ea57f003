"""The engine side of `--fronts K`: the front processes, started, fed and stopped by `jetinfer serve`.

    front 1 (NATS: intake → form → settle) ─┐
    front 2 (NATS: intake → form → settle) ─┼─ link ─▶ engine (this process): decode, make, run ─▶ link
    ...                                     ─┘

Each front pulls, prepares and answers on a NATS connection of its own (`worker.front`); this process keeps
the models (their slots, reloads, the decoding processes and GPU lanes) and runs every front's batches:
`EngineModel` decodes what its strategy does not take encoded, makes a batch into the model's input ahead
while another runs, runs it (splitting a failing batch, as in-process), and sends the outcomes back.

A front that dies is started again (its messages come back after ack_wait); one that keeps dying
(MAX_RESTARTS within RESTART_WINDOW_S) fails the worker, as a failed pipeline does, and the pod is
restarted. The engine's death kills the fronts (`jetinfer.children`), and a front that
loses the link gives back what it holds. /metrics is this process's registry with every front's last
snapshot added in (`MergedRegistry`), /readyz waits for every front.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from jetinfer import children
from jetinfer.errors import BackendError, FrontProcessError, RequestError

from .autoconfig import Plan, Rates
from .batcher import Batch
from .forming import BatchFormer
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
from .pipeline import choose_engine
from .prepare import PreparedRequest
from .preprocess import Preprocessing
from .reload import ModelSlot
from .run import Outputs, Runner
from .settings import WorkerSettings

__all__ = ["EngineModel", "Fronts", "MergedRegistry"]

logger = logging.getLogger(__name__)

#: How long a front may take to connect and say so before the worker gives up on it.
FRONT_START_S = 60.0
#: Fronts started again within RESTART_WINDOW_S after which the next death stops the worker (a loop).
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0


def _prepared(remote: RemoteRequest) -> PreparedRequest:
    # The NATS message stays in the front; nothing on the engine's path reads it.
    return PreparedRequest(
        msg=cast(Msg, None),
        request_id=remote.request_id,
        reply_to=None,
        deliveries=1,
        enqueued_at=remote.enqueued_at,
        deadline_s=remote.deadline_s,
        inputs=dict(remote.inputs),
        frames=remote.frames,
        content_type=remote.content_type,
        encoded=remote.encoded,
        pixels=remote.pixels,
    )


class EngineModel:
    """Runs the fronts' batches of one model on this process's backend."""

    def __init__(
        self,
        model: str,
        slot: ModelSlot,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        decode_pool: ThreadPoolExecutor,
        cores: tuple[int, str],
        rates: Rates | None = None,
    ) -> None:
        self.model = model
        self._rates = rates
        self._slot = slot
        self._settings = settings
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._cores = cores
        self.plan: Plan | None = None
        self._preprocessing: Preprocessing | None = None
        self._runner: Runner | None = None
        self._room: asyncio.Semaphore | None = None
        self._former: BatchFormer | None = None

    @property
    def max_batch(self) -> int:
        """Frames per batch: the setting, capped by the serving version's config."""
        return self._slot.max_batch(self._settings.max_batch)

    @property
    def batches_run(self) -> int:
        """Batches run so far."""
        return self._runner.batches_run if self._runner is not None else 0

    @property
    def isolated_runs(self) -> int:
        """Re-runs of parts of failed batches (to find the failing requests)."""
        return self._runner.isolated_runs if self._runner is not None else 0

    async def start(self) -> None:
        """Choose the plan, the preprocessing and the runner (as an in-process pipeline would)."""
        self.plan, self._preprocessing, self._runner = await choose_engine(
            self.model,
            self._slot,
            self._settings,
            self._metrics,
            cores=self._cores,
            max_batch=self.max_batch,
            rates=self._rates,
        )
        self._former = BatchFormer.of(
            self._preprocessing, self._decode_pool, threads=self.plan.decode_threads, settings=self._settings
        )
        # Batches being made ahead and run at once: what the strategy reserved GPU memory for.
        self._room = asyncio.Semaphore(self.plan.pipeline_depth + self._runner.slots)
        logger.info(
            "model %s: running the front processes' batches (max_batch=%d; %s; chosen from: %s)",
            self.model,
            self.max_batch,
            self._preprocessing.describe(),
            self.plan.describe(),
        )

    def serve_message(self) -> Serve:
        """What a front needs to serve this model's serving version."""
        current = self._slot.current
        assert current is not None, "started once a version is loaded"
        assert self.plan is not None, "start() chooses it"
        return Serve(self.model, current.config, self.max_batch, self.plan)

    async def run(self, request: RunBatch) -> BatchDone:
        """Run a front's batch; every request's outcome, in order (never raises for a request's fault)."""
        assert self._room is not None, "start() comes first"
        async with self._room:
            try:
                return await self._run(request)
            except Exception as exc:  # a bug here must not lose the front's messages: they are retried
                logger.exception(
                    "model %s: running a front's batch of %d failed", self.model, len(request.requests)
                )
                error = WireError.of(BackendError(f"running the batch failed: {type(exc).__name__}: {exc}"))
                return BatchDone(
                    request.batch_id, "", time.time(), 0.0, tuple(error for _ in request.requests)
                )

    async def _run(self, request: RunBatch) -> BatchDone:
        assert self._preprocessing is not None, "start() chooses it"
        assert self._runner is not None, "start() makes it"
        assert self._former is not None, "start() makes it"
        preprocessing, runner = self._preprocessing, self._runner
        current = self._slot.current
        assert current is not None, "a serving model keeps a version"
        config = current.config
        requests = [_prepared(r) for r in request.requests]
        # Decoded here where this strategy decodes on the CPU threads (all of it, on a CPU backend).
        batches, refused = await self._former.batch(requests, config, self.max_batch)
        outcomes: dict[int, Outputs | RequestError] = {id(r): r.error for r in refused if r.error is not None}
        version, started, infer_s = "", time.time(), 0.0
        for batch in batches:
            made: Batch = batch
            if runner.busy > 0 and preprocessing.wants_ahead(batch):
                made = await preprocessing.ahead(batch, config)  # in a lane, while another batch runs
            ran = await runner.run(made)
            version, started, infer_s = (
                ran.version or version,
                min(started, ran.started_at),
                infer_s + ran.infer_s,
            )
            for prepared, result in zip(batch.requests, ran.results, strict=True):
                outcomes[id(prepared)] = result
        results = tuple(
            WireError.of(outcome) if isinstance(outcome, RequestError) else outcome
            for outcome in (outcomes[id(r)] for r in requests)
        )
        return BatchDone(request.batch_id, version, started, infer_s, results)

    def close(self) -> None:
        """Stop the inference threads and release the preprocessing's processes and GPU memory."""
        if self._runner is not None:
            self._runner.close()
        if self._preprocessing is not None:
            self._preprocessing.close()


class _FrontProcess:
    """One front: its process, its link and what it last said."""

    def __init__(self, number: int, process: subprocess.Popen[bytes], link: Link) -> None:
        self.number = number
        self.process = process
        self.link = link
        self.state = FrontState(False, ())
        self.said = asyncio.Event()  # set at the first FrontState
        self.families: tuple[Any, ...] = ()
        self.reader: asyncio.Task[None] | None = None
        self.running: set[asyncio.Task[None]] = set()


class Fronts:
    """The worker's front processes."""

    def __init__(
        self,
        settings: WorkerSettings,
        count: int,
        engines: dict[str, EngineModel],
        on_failure: Callable[[], None],
        restarts: Counter,
    ) -> None:
        self._settings = settings
        self._restarted = restarts  # jetinfer_front_restarts_total
        self.count = count
        self._engines = engines
        self._on_failure = on_failure
        self._fronts: list[_FrontProcess] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._serving: dict[str, Serve] = {}
        self._restarts: list[float] = []  # when fronts were started again (monotonic)
        self._stopping = False
        self._started = False  # until then a front that dies fails the start instead
        self._state_changed = asyncio.Event()  # set whenever a front's state changes
        self._failed = False  # fronts kept dying: the worker stops

    async def start(self) -> None:
        """Start every front and wait until each is connected to NATS (bounded: FRONT_START_S)."""
        for number in range(1, self.count + 1):
            self._fronts.append(await self._launch(number))
        for front in self._fronts:
            await self._until_connected(front)
        self._started = True
        logger.info(
            "%d front processes (pids %s) pull, prepare and answer; this process runs their batches",
            self.count,
            ", ".join(str(f.process.pid) for f in self._fronts),
        )

    async def _launch(self, number: int) -> _FrontProcess:
        ours, theirs = socket.socketpair()
        try:
            process = children.spawn(
                [
                    sys.executable,
                    "-m",
                    "jetinfer.worker.front",
                    str(theirs.fileno()),
                    self._settings.event_loop,
                ],
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        front = _FrontProcess(number, process, await Link.open(ours))
        await front.link.send(Hello(self._settings, number, logging.getLogger().getEffectiveLevel()))
        front.reader = asyncio.create_task(self._read(front), name=f"front-{number}")
        self._readers.add(front.reader)
        front.reader.add_done_callback(self._readers.discard)
        return front

    async def _until_connected(self, front: _FrontProcess) -> None:
        assert front.reader is not None
        said = asyncio.create_task(front.said.wait())
        await asyncio.wait({said, front.reader}, timeout=FRONT_START_S, return_when=asyncio.FIRST_COMPLETED)
        said.cancel()
        if not front.said.is_set():
            raise FrontProcessError(
                f"front process {front.number} "
                + (
                    "exited before it connected to NATS (its error is above)"
                    if front.reader.done()
                    else f"did not connect to NATS within {FRONT_START_S:.0f} s"
                )
            )

    def _fail(self) -> None:
        self._failed = True
        self._state_changed.set()
        self._on_failure()

    async def _restart(self, gone: _FrontProcess) -> None:
        """Start a front again in the place of one that died, and have it serve every model."""
        front = await self._launch(gone.number)
        self._fronts[self._fronts.index(gone)] = front
        try:
            await self._until_connected(front)
        except FrontProcessError as exc:
            logger.error("%s; the worker stops", exc)
            self._fail()
            return
        for message in self._serving.values():
            await _send_quietly(front.link, message)
        logger.info("front process %d started again (pid %d)", front.number, front.process.pid)

    async def serve(self, message: Serve) -> None:
        """Tell every front to serve a model (or of its new config), and wait until each says it does
        (bounded: FRONT_START_S), so a worker that has started serves through all of them."""
        self._serving[message.model] = message  # for a front started again later
        for front in self._fronts:
            await _send_quietly(front.link, message)  # its reader reports the front gone
        deadline = asyncio.get_running_loop().time() + FRONT_START_S
        while not self._failed and not all(
            message.model in f.state.serving or _gone(f) for f in self._fronts
        ):
            self._state_changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._state_changed.wait(), max(0.0, remaining))
            except TimeoutError:
                logger.warning(
                    "model %s: not every front process serves it %.0f s after it was asked to (see /readyz)",
                    message.model,
                    FRONT_START_S,
                )
                return

    def ready(self) -> bool:
        """Whether every front is connected and serves every model this process runs."""
        models = set(self._engines)
        return all(f.state.connected and models <= set(f.state.serving) for f in self._fronts)

    def describe(self) -> list[dict[str, Any]]:
        """Each front's state, for /readyz."""
        return [
            {
                "front": f.number,
                "pid": f.process.pid,
                "connected": f.state.connected,
                "serving": list(f.state.serving),
            }
            for f in self._fronts
        ]

    def families(self) -> Iterator[tuple[Any, ...]]:
        """Every front's last metrics snapshot, family by family."""
        for front in self._fronts:
            yield from front.families

    async def _read(self, front: _FrontProcess) -> None:
        try:
            while True:
                message = await front.link.receive()
                if isinstance(message, RunBatch):
                    task = asyncio.create_task(self._run(front, message), name=f"front-{front.number}-batch")
                    front.running.add(task)
                    task.add_done_callback(front.running.discard)
                elif isinstance(message, FrontState):
                    front.state = message
                    front.said.set()
                    self._state_changed.set()
                elif isinstance(message, MetricsSnapshot):
                    front.families = message.families
        except LinkClosedError:
            front.state = FrontState(False, front.state.serving)
            if not self._stopping:
                await self._after_death(front)
        finally:
            self._state_changed.set()  # this front is gone (and this task done) once waiters look

    async def _after_death(self, front: _FrontProcess) -> None:
        """A front died: start it again, unless fronts keep dying (then the worker stops)."""
        await front.link.close()
        if not self._started:
            return  # start() says so
        status = await asyncio.to_thread(_wait, front.process, 5.0)
        if status is None:  # its end of the link closed, yet it runs on: it is not serving
            front.process.kill()
            status = await asyncio.to_thread(front.process.wait)
        children.forget(front.process)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        said = (
            f"front process {front.number} (pid {front.process.pid}) is gone (exit status {status}); what it "
            "held is served again after ack_wait"
        )
        if self._stopping or len(self._restarts) >= MAX_RESTARTS:
            logger.error(
                "%s; %d restarts within %.0f s: the worker stops", said, len(self._restarts), RESTART_WINDOW_S
            )
            self._fail()
            return
        self._restarts.append(now)
        self._restarted.inc()
        logger.error("%s; starting it again", said)
        await self._restart(front)

    async def _run(self, front: _FrontProcess, message: RunBatch) -> None:
        engine = self._engines.get(message.model)
        if engine is None:
            error = WireError.of(BackendError(f"model {message.model} is not run by this worker"))
            done = BatchDone(message.batch_id, "", time.time(), 0.0, tuple(error for _ in message.requests))
        else:
            done = await engine.run(message)
        await _send_quietly(front.link, done)  # the front is gone: its messages come back after ack_wait

    async def stop(self, grace_s: float) -> None:
        """Have every front finish its batches in flight and exit, within `grace_s`; kill what does not."""
        self._stopping = True
        for front in self._fronts:
            await _send_quietly(front.link, Stop(grace_s))  # gone already
        await asyncio.gather(*(asyncio.to_thread(_wait, f.process, grace_s + 5.0) for f in self._fronts))
        for front in self._fronts:
            if front.process.poll() is None:
                logger.warning(
                    "front process %d did not stop within the grace period; killing it", front.number
                )
                front.process.kill()
                await asyncio.to_thread(front.process.wait)
            children.forget(front.process)
            await front.link.close()
        readers = list(self._readers)  # those of fronts started again too
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


def _gone(front: _FrontProcess) -> bool:
    """Whether a front's link has closed (it died; one started again takes its place in the list)."""
    return front.reader is None or front.reader.done()


async def _send_quietly(link: Link, message: object) -> None:
    """Send, where a front gone already is no error (its reader reports it gone)."""
    with contextlib.suppress(LinkClosedError):
        await link.send(message)


def _wait(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


class MergedRegistry(CollectorRegistry):
    """This process's metrics with every front's last snapshot added in: counters, histograms and gauges
    summed sample by sample (each request is counted by the one front that settled it)."""

    def __init__(self, own: CollectorRegistry, fronts: Callable[[], Iterable[tuple[Any, ...]]]) -> None:
        super().__init__(auto_describe=False)
        self._own = own
        self._fronts = fronts

    def collect(self) -> Iterator[Metric]:
        """The merged families."""
        merged: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for family in self._own.collect():
            merged[family.name] = family
            values[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for name, kind, documentation, samples in self._fronts():
            if name not in merged:
                merged[name] = Metric(name, documentation, kind)
                values[name] = {}
            into = values[name]
            for sample_name, labels, value in samples:
                if sample_name.endswith("_created"):
                    continue  # a time, not a count
                key = (sample_name, tuple(sorted(labels.items())))
                into[key] = into.get(key, 0.0) + value
        for name, family in merged.items():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
            yield out


#: The front processes a worker on a GPU chooses: two took ResNet-50 from 0.78 to 0.89 of its engine and
#: the light engine's one-JPEG messages from 6.8k to 12.4k img/s in one run (the engine process's GIL
#: left to feeding the GPU; one event loop moves about 12k messages a second); three moved no more than
#: two, four less (each takes a core from decoding). They cost about 0.5 ms at idle (docs/benchmarks.md).
CHOSEN_FRONTS = 2
#: The fewest cores with which a worker chooses front processes (they take cores from decoding).
FRONTS_MIN_CORES = 8


def front_count(
    settings: WorkerSettings, *, image_model_on_gpu: bool, cores: int, engine_rate: float | None
) -> tuple[int, str]:
    """How many front processes this worker starts, and why: the setting where given, else two for an
    image model on a GPU with the cores to spare (`engine_rate`, where measured at start, is said)."""
    if settings.fronts is not None:
        return settings.fronts, "--fronts"
    if not image_model_on_gpu:
        return 0, "one process: a CPU backend or a tensor model leaves its event loop time to spare"
    if cores < FRONTS_MIN_CORES:
        return 0, f"one process: {cores} cores are too few to share with front processes"
    engine = f", engine {engine_rate:,.0f} img/s" if engine_rate is not None else ""
    return (
        CHOSEN_FRONTS,
        f"an image model on a GPU{engine}: this process's GIL is left to feeding it; --fronts 0 saves "
        "about 0.5 ms at idle",
    )
