"""The worker's lifecycle without a server: fake messages, a fake backend, fake NATS.

One test per row of the settle stage's outcome → action table (which call, which delay, which DLQ
reason, which reply), the preprocessing factory's choice per configuration, and the shutdown order.
Integration tests against real nats-server processes (test_delivery, test_faults, ...) cover the same
paths end to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import pytest
from nats.errors import MaxPayloadError
from prometheus_client import CollectorRegistry

from jetinfer.errors import BackendError, InvalidInputError
from jetinfer.protocol import (
    HEADER_DLQ_REASON,
    HEADER_STATUS,
    InferRequest,
    Limits,
    Tensor,
    decode_reply,
    encode_request,
    request_headers,
)
from jetinfer.repository import ModelConfig, ModelVersion, PreprocessConfig, TensorSpec, write_version
from jetinfer.worker.autoconfig import plan
from jetinfer.worker.backends.base import Backend, BackendOptions
from jetinfer.worker.batcher import make_batches
from jetinfer.worker.intake import Delivery
from jetinfer.worker.metrics import WorkerMetrics
from jetinfer.worker.pipeline import Pipeline
from jetinfer.worker.prepare import PreparedRequest, prepare_request
from jetinfer.worker.preprocess import (
    CpuDecoding,
    GpuDecode,
    GpuNormalise,
    GpuTools,
    ProcessDecoding,
    choose_preprocessing,
)
from jetinfer.worker.reload import ModelSlot
from jetinfer.worker.replies import ReplyRefusals
from jetinfer.worker.run import RanBatch
from jetinfer.worker.settings import WorkerSettings
from jetinfer.worker.settle import AckAction, Settler

MODEL = "toy"
INPUT = np.arange(4, dtype=np.float32).reshape(1, 4)


# -- fakes ------------------------------------------------------------------------------------------


class Log(list[tuple[str, ...]]):
    """Every call the fakes saw, in order."""


class FakeMsg:
    """A delivered JetStream message that records how it was settled."""

    def __init__(self, log: Log, number: int, *, deliveries: int = 1, reply_to: str = "_INBOX.c.1") -> None:
        self.log = log
        self.number = number
        self.subject = f"infer.{MODEL}"
        self.reply = f"$JS.ACK.INFER.worker-{MODEL}.{deliveries}.{number}.{number}.1732490000000000000.0"
        self.data = encode_request(InferRequest(id=f"r{number}", inputs=[Tensor.from_numpy("input", INPUT)]))
        self.headers = request_headers(f"r{number}", reply_to)
        self.settled: list[tuple[str, float | None]] = []

    async def ack(self) -> None:
        self._record("ack", None)

    async def nak(self, delay: float | None = None) -> None:
        self._record("nak", delay)

    async def term(self) -> None:
        self._record("term", None)

    async def in_progress(self) -> None:
        self.log.append(("in_progress", str(self.number)))

    def _record(self, action: str, delay: float | None) -> None:
        self.settled.append((action, delay))
        self.log.append((action, str(self.number)))


class FakeJetStream:
    """Records JetStream publishes (DLQ copies, durable replies) and answers with a PubAck."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> Any:
        self.published.append((subject, payload, headers))
        self.log.append(("js.publish", subject))
        return type("PubAck", (), {"duplicate": False})()


class FakeNats:
    """Core NATS: records publishes; a subject in `refuse` is refused the way nats-server does it (an
    asynchronous error, which arrives before the next flush returns); `max_payload` is enforced."""

    def __init__(self, log: Log, refusals: ReplyRefusals, *, refuse: frozenset[str] = frozenset()) -> None:
        self.log = log
        self.refusals = refusals
        self.refuse = refuse
        self.max_payload = 1 << 20
        self.published: list[tuple[str, bytes, dict[str, str]]] = []
        self._errors: list[Exception] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        if len(payload) > self.max_payload:
            raise MaxPayloadError
        self.published.append((subject, payload, headers))
        self.log.append(("publish", subject))
        if subject in self.refuse:
            self._errors.append(Exception(f'nats: Permissions Violation for Publish to "{subject}"'))

    async def flush(self, timeout: float) -> None:
        self.log.append(("flush",))
        errors, self._errors = self._errors, []
        for error in errors:
            await self.refusals.on_error(error)


class FakeBackend(Backend):
    """Doubles its input; once `gate` is given, each batch says it `entered` and waits for the gate."""

    name = "fake"

    def __init__(self, version: ModelVersion, options: BackendOptions | None, gate: Any = None) -> None:
        super().__init__(version, options)
        self.gate = gate
        self.entered = threading.Event()

    def infer(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(30)
        return {"output": inputs["input"] * 2}


def settings(**overrides: Any) -> WorkerSettings:
    return WorkerSettings(
        model=[MODEL], metrics_port=0, max_deliver=3, nak_delays_ms=[250, 1000], **overrides
    )


def config() -> ModelConfig:
    return ModelConfig(
        name=MODEL,
        max_batch=8,
        inputs=(TensorSpec("input", "FP32", (4,)),),
        outputs=(TensorSpec("output", "FP32", (4,)),),
    )


def request_for(msg: FakeMsg) -> PreparedRequest:
    request = prepare_request(msg, config(), max_batch=8, limits=Limits())  # type: ignore[arg-type]
    assert request.error is None, request.error
    return request


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def world(log: Log) -> Any:
    """A settler with fake NATS; `world.refuse` names subjects the server refuses."""
    refusals = ReplyRefusals()
    nc = FakeNats(log, refusals, refuse=frozenset({"_INBOX.other.1"}))
    js = FakeJetStream(log)
    metrics = WorkerMetrics(CollectorRegistry())
    settler = Settler(MODEL, nc, js, settings(), metrics, refusals)  # type: ignore[arg-type]
    return type("World", (), {"settler": settler, "nc": nc, "js": js, "metrics": metrics, "log": log})


def ran(request: PreparedRequest, result: Any) -> RanBatch:
    [batch] = make_batches([request], 8)
    return RanBatch(batch, "1", 0.0, 0.001, (result,))


def dlq_reasons(js: FakeJetStream) -> list[str]:
    return [headers[HEADER_DLQ_REASON] for subject, _, headers in js.published if subject == f"dlq.{MODEL}"]


def replies(nc: FakeNats) -> list[tuple[str, str]]:
    """(subject, ok|error code) of every reply published."""
    out = []
    for subject, body, headers in nc.published:
        reply = decode_reply(body)
        out.append((subject, headers[HEADER_STATUS] if headers[HEADER_STATUS] == "ok" else reply.code))
    return out


# -- the outcome → action table ------------------------------------------------------------------------


def inflight(world: Any) -> float | None:
    """The in-flight gauge as a scrape reads it."""
    value = world.metrics.registry.get_sample_value("jetinfer_inflight_requests", {"model": MODEL})
    return None if value is None else float(value)


async def test_answered_reply_is_acked_once_a_flush_confirms_it(world: Any, log: Log) -> None:
    msg = FakeMsg(log, 1)
    world.settler.hold([Delivery(msg, touched=0.0)])  # type: ignore[arg-type]
    assert inflight(world) == 1
    await world.settler.answer(ran(request_for(msg), {"output": INPUT * 2}))
    assert msg.settled == []  # published, not yet confirmed
    assert inflight(world) == 1
    await world.settler.confirm()
    assert msg.settled == [("ack", None)]
    assert inflight(world) == 0
    assert log.index(("publish", "_INBOX.c.1")) < log.index(("flush",)) < log.index(("ack", "1"))
    assert replies(world.nc) == [("_INBOX.c.1", "ok")]
    assert dlq_reasons(world.js) == []


async def test_permanent_error_gets_an_error_reply_a_dlq_copy_and_term(world: Any, log: Log) -> None:
    msg = FakeMsg(log, 2)
    await world.settler.fail(request_for(msg), InvalidInputError("bad shape"), version="1")
    assert msg.settled == [("term", None)]
    assert replies(world.nc) == [("_INBOX.c.1", "invalid_input")]
    assert dlq_reasons(world.js) == ["invalid_input"]
    assert (
        log.index(("publish", "_INBOX.c.1"))
        < log.index(("js.publish", f"dlq.{MODEL}"))
        < log.index(("term", "2"))
    )


@pytest.mark.parametrize(("deliveries", "delay"), [(1, 0.25), (2, 1.0)])
async def test_retryable_error_naks_with_the_growing_delay(
    world: Any, log: Log, deliveries: int, delay: float
) -> None:
    msg = FakeMsg(log, 3, deliveries=deliveries)
    await world.settler.fail(request_for(msg), BackendError("out of memory"), version="1")
    assert msg.settled == [("nak", delay)]
    assert world.nc.published == []
    assert dlq_reasons(world.js) == []


async def test_retryable_error_on_the_last_delivery_is_answered_copied_and_termed(
    world: Any, log: Log
) -> None:
    msg = FakeMsg(log, 4, deliveries=3)  # max_deliver=3
    await world.settler.fail(request_for(msg), BackendError("out of memory"), version="1")
    assert msg.settled == [("term", None)]
    assert replies(world.nc) == [("_INBOX.c.1", "internal")]
    assert dlq_reasons(world.js) == ["internal"]


async def test_not_started_is_given_back_at_once(world: Any, log: Log) -> None:
    msgs = [FakeMsg(log, 5), FakeMsg(log, 6)]
    await world.settler.give_back(msgs)
    assert [m.settled for m in msgs] == [[("nak", None)], [("nak", None)]]
    assert world.nc.published == []


@pytest.mark.parametrize(("deliveries", "expected"), [(1, [("nak", 0.25)]), (3, [("term", None)])])
async def test_a_preparation_bug_is_retryable_and_never_replies(
    world: Any, log: Log, deliveries: int, expected: list[Any]
) -> None:
    msg = FakeMsg(log, 7, deliveries=deliveries)
    await world.settler.preparation_failed([msg], RuntimeError("a bug"))
    assert msg.settled == expected
    assert world.nc.published == []  # its reply subject was never checked
    assert dlq_reasons(world.js) == ([] if deliveries == 1 else ["internal"])


async def test_a_reply_the_server_refuses_is_termed_copied_and_counted(world: Any, log: Log) -> None:
    msg = FakeMsg(log, 8, reply_to="_INBOX.other.1")
    await world.settler.answer(ran(request_for(msg), {"output": INPUT * 2}))
    await world.settler.confirm()
    assert msg.settled == [("term", None)]
    assert [s for s, _ in replies(world.nc)] == ["_INBOX.other.1"]  # the reply only, no error reply after it
    assert dlq_reasons(world.js) == ["reply_refused"]
    refused = world.metrics.registry.get_sample_value(
        "jetinfer_replies_refused_total", {"model": MODEL, "version": "1", "status": "reply_refused"}
    )
    assert refused == 1.0


async def test_a_reply_over_max_payload_is_a_too_large_error(world: Any, log: Log) -> None:
    world.nc.max_payload = 600  # the reply of 4 floats fits, and the error reply; 4096 floats do not
    msg = FakeMsg(log, 9)
    await world.settler.answer(ran(request_for(msg), {"output": np.zeros((1, 4096), np.float32)}))
    assert msg.settled == [("term", None)]
    assert replies(world.nc) == [("_INBOX.c.1", "too_large")]
    assert dlq_reasons(world.js) == ["too_large"]


async def test_a_reply_whose_headers_take_it_over_max_payload_never_reaches_the_server(
    world: Any, log: Log
) -> None:
    # nats-py checks the body alone; the server counts the headers too and would close the connection.
    msg = FakeMsg(log, 13)
    request = request_for(msg)
    batch = ran(request, {"output": INPUT * 2})
    world.nc.max_payload = len(world.settler._body(request, {"output": INPUT * 2}, batch)) + 12
    await world.settler.answer(batch)
    assert msg.settled == [("term", None)]
    assert [code for _, code in replies(world.nc)] == []  # nothing over the limit went out
    assert dlq_reasons(world.js) == ["too_large"]
    [(_, data, headers)] = world.js.published
    assert (data, headers["Jetinfer-Dlq-Truncated"]) == (b"", str(len(msg.data)))  # the copy fits too


async def test_a_durable_reply_is_acked_after_the_streams_puback(world: Any, log: Log) -> None:
    msg = FakeMsg(log, 10, reply_to="results.job-1.10")
    await world.settler.answer(ran(request_for(msg), {"output": INPUT * 2}))
    await world.settler.drain()
    assert msg.settled == [("ack", None)]
    assert [s for s, _, _ in world.js.published] == ["results.job-1.10"]
    assert world.nc.published == []


async def test_held_messages_get_in_progress_once_stale(world: Any, log: Log) -> None:
    fresh, stale = FakeMsg(log, 11), FakeMsg(log, 12)
    world.settler.hold([Delivery(fresh, touched=1e12), Delivery(stale, touched=0.0)])  # type: ignore[arg-type]
    assert await world.settler.keep_alive(10.0) == 1
    assert ("in_progress", "12") in log
    assert ("in_progress", "11") not in log


def test_the_actions_are_the_three_jetstream_knows() -> None:
    assert {a.value for a in AckAction} == {"ack", "nak", "term"}


# -- the preprocessing factory ---------------------------------------------------------------------------


class NoGpu:
    """Stands in for the GPU tools: the factory's choice is tested, not CUDA."""

    library = "stand-in"

    def __init__(self, config: PreprocessConfig, **_: Any) -> None:
        self.config = config
        self.processes = _.get("processes", 0)
        self.buffer = np.zeros(16, np.uint8)

    def pin(self, host: Any) -> bool:
        return False

    def close(self) -> None:
        pass


IMAGE_MODEL = dataclasses.replace(
    config(),
    inputs=(TensorSpec("input", "FP32", (3, 8, 8)),),
    preprocess=PreprocessConfig(input="input", width=8, height=8),
)


@pytest.mark.parametrize(
    ("flags", "chosen", "keeps_jpeg", "keeps_png"),
    [
        ({"gpu_normalise": False, "gpu_decode": False}, CpuDecoding, False, False),
        ({"gpu_normalise": True, "decode_processes": 0, "gpu_decode": False}, GpuNormalise, False, False),
        ({"gpu_decode": True}, GpuDecode, True, False),
        ({"gpu_decode": True, "gpu_normalise": True, "decode_processes": 0}, GpuDecode, True, False),
        ({"gpu_normalise": True, "decode_processes": 2, "gpu_decode": False}, ProcessDecoding, True, True),
        ({"decode_processes": 2, "gpu_decode": True}, ProcessDecoding, True, True),
        ({}, ProcessDecoding, True, True),  # what an image model on a GPU gets with no flags
    ],
)
def test_the_factory_chooses_one_strategy_per_configuration(
    flags: dict[str, Any], chosen: type, keeps_jpeg: bool, keeps_png: bool
) -> None:
    tools = GpuTools(normaliser=NoGpu, jpeg_decoder=NoGpu, processes=NoGpu)  # type: ignore[arg-type]
    the_plan = plan(settings(**flags), IMAGE_MODEL, on_gpu=True, cores=8, cores_why="test")
    strategy = choose_preprocessing(the_plan, settings(**flags), IMAGE_MODEL, 8, tools)
    try:
        assert type(strategy) is chosen
        assert strategy.keeps_encoded("image/jpeg", b"\xff\xd8\xff\xe0") is keeps_jpeg
        assert strategy.keeps_encoded("image/png", b"\x89PNG") is keeps_png
        assert strategy.on_gpu is (chosen is not CpuDecoding)
        assert strategy.describe()
    finally:
        strategy.close()


def test_a_tensor_model_or_a_cpu_backend_decodes_on_the_cpu_threads() -> None:
    tools = GpuTools(normaliser=NoGpu, jpeg_decoder=NoGpu, processes=NoGpu)  # type: ignore[arg-type]
    for model, on_gpu in ((config(), True), (IMAGE_MODEL, False)):
        the_plan = plan(settings(), model, on_gpu=on_gpu, cores=8, cores_why="test")
        assert type(choose_preprocessing(the_plan, settings(), model, 8, tools)) is CpuDecoding
        assert the_plan.decode_threads == 8
        assert the_plan.gil_switch_ms == 0.0


# -- shutdown order --------------------------------------------------------------------------------------


class FakeIntake:
    """Hands out `deliveries` one at a time; `stop` returns what was never taken."""

    def __init__(self, log: Log, deliveries: list[Delivery]) -> None:
        self.log = log
        self.capacity = 1
        self._queue = list(deliveries)

    async def start(self) -> None:
        self.log.append(("intake.start",))

    async def get(self, max_items: int, max_wait_s: float) -> list[Delivery]:
        if not self._queue:
            await asyncio.sleep(0.01)
            return []
        return [self._queue.pop(0)]

    def buffered_entries(self) -> list[Delivery]:
        return list(self._queue)

    async def renew(self) -> None:
        pass

    async def stop(self) -> list[Any]:
        self.log.append(("intake.stop",))
        left, self._queue = self._queue, []
        return [delivery.msg for delivery in left]


async def test_shutdown_stops_fetching_gives_back_the_unstarted_and_answers_the_batch_in_flight(
    tmp_path: Path, log: Log
) -> None:
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"not read: the fake backend is given the version")
    write_version(tmp_path / "repo", config(), model_file, backend="onnxruntime")
    gate = threading.Event()
    backends: list[FakeBackend] = []

    def load(version: ModelVersion, options: BackendOptions) -> Backend:
        backends.append(FakeBackend(version, options))
        return backends[-1]

    slot = ModelSlot(
        MODEL, tmp_path / "repo", metrics=WorkerMetrics(CollectorRegistry()), backend_factory=load
    )
    assert (await slot.refresh()).status == "loaded"
    backends[-1].gate = gate  # the warm-up ran; from now on every batch waits for the gate
    refusals = ReplyRefusals()
    nc, js = FakeNats(log, refusals), FakeJetStream(log)
    msgs = [FakeMsg(log, n, reply_to=f"_INBOX.c.{n}") for n in range(1, 6)]
    intake = FakeIntake(log, [Delivery(m, touched=0.0) for m in msgs])  # type: ignore[arg-type]
    with ThreadPoolExecutor(2) as pool:
        pipeline = Pipeline(
            model=MODEL,
            nc=nc,  # type: ignore[arg-type]
            js=js,  # type: ignore[arg-type]
            settings=settings(max_batch=1),
            slot=slot,
            metrics=WorkerMetrics(CollectorRegistry()),
            decode_pool=pool,
            refusals=refusals,
            intake=intake,
        )
        await pipeline.start()
        # The first batch runs (held at the gate), the second waits in the queue, three are still buffered.
        for _ in range(500):
            if backends[-1].entered.is_set() and len(intake.buffered_entries()) == 3:
                break
            await asyncio.sleep(0.01)
        assert backends[-1].entered.is_set()
        stopping = asyncio.create_task(pipeline.stop(grace_s=10))
        await asyncio.sleep(0.1)
        gate.set()  # the batch in flight finishes
        await stopping
    slot.close()
    [first_in_flight] = [m for m in msgs if m.settled == [("ack", None)]]
    given_back = [m for m in msgs if m.settled == [("nak", None)]]
    assert len(given_back) == 4
    assert all(len(m.settled) == 1 for m in msgs), [m.settled for m in msgs]
    # The order: stop fetching, give back the unstarted at once, then answer and ack the batch in flight.
    stop_at = log.index(("intake.stop",))
    first_nak = min(log.index(("nak", str(m.number))) for m in given_back)
    assert stop_at < first_nak < log.index(("ack", str(first_in_flight.number)))
    assert log.index(("publish", f"_INBOX.c.{first_in_flight.number}")) < log.index(
        ("ack", str(first_in_flight.number))
    )


def test_the_fake_message_body_is_a_real_request() -> None:
    body = msgpack.unpackb(FakeMsg(Log(), 1).data)
    assert body["id"] == "r1"


def test_gpu_decode_lanes_sit_beside_the_process_lanes() -> None:
    tools = GpuTools(normaliser=NoGpu, jpeg_decoder=NoGpu, processes=NoGpu)  # type: ignore[arg-type]
    flags = {"decode_processes": 4, "gpu_decode": True, "gpu_decode_lanes": 1}
    the_plan = plan(settings(**flags), IMAGE_MODEL, on_gpu=True, cores=8, cores_why="test")
    strategy = choose_preprocessing(the_plan, settings(**flags), IMAGE_MODEL, 8, tools)
    try:
        assert type(strategy) is ProcessDecoding
        assert strategy.lanes == 3
        assert "1 more lane(s) decoding JPEG batches on the GPU" in strategy.describe()
    finally:
        strategy.close()


class FailingGpuDecoder(NoGpu):
    """A GPU JPEG decoder that fails as CUDA does when memory runs out."""

    def decode(self, images: list[bytes]) -> Any:
        raise RuntimeError("CUDA error: out of memory")


async def test_a_batch_that_fails_to_be_made_ahead_is_left_to_the_run_stage() -> None:
    tools = GpuTools(normaliser=NoGpu, jpeg_decoder=FailingGpuDecoder, processes=NoGpu)  # type: ignore[arg-type]
    flags = {"gpu_decode": True}
    the_plan = plan(settings(**flags), IMAGE_MODEL, on_gpu=True, cores=8, cores_why="test")
    strategy = choose_preprocessing(the_plan, settings(**flags), IMAGE_MODEL, 8, tools)
    try:
        assert type(strategy) is GpuDecode
        [formed] = make_batches([request_for(FakeMsg(Log(), 1))], 8)
        batch = dataclasses.replace(formed, encoded=(b"\xff\xd8\xff\xe0",))  # one JPEG left encoded
        assert strategy.wants_ahead(batch)
        made = await strategy.ahead(batch, IMAGE_MODEL)  # raised into the run stage before
        assert made is batch
        assert made.on_device is None
    finally:
        strategy.close()
