"""The garbage collector in a worker process (worker/gc_tuning.py): thresholds, the frozen start-up heap,
a retired model's cycles freed all the same, the collections' time exported, and no refused request left
for the collector to free."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from jetinfer.protocol import HEADER_CONTENT_TYPE, HEADER_DEADLINE, HEADER_MSG_ID, Limits
from jetinfer.repository import ModelConfig, PreprocessConfig, TensorSpec
from jetinfer.worker import gc_tuning
from jetinfer.worker.metrics import WorkerMetrics
from jetinfer.worker.prepare import prepare_request
from jetinfer.worker.preprocess import CpuDecoding


@pytest.fixture(autouse=True)
def python_gc_restored() -> Iterator[None]:
    """Each test leaves pytest's process with the collector as it found it."""
    thresholds = gc.get_threshold()
    yield
    gc_tuning.collect_everything()
    gc.set_threshold(*thresholds)
    gc_tuning.clock.uninstall()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_tune_raises_the_youngest_threshold_and_zero_restores_pythons() -> None:
    gc_tuning.tune(20_000)
    assert gc.get_threshold() == (20_000, 10, 10)
    gc_tuning.tune(0)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_frozen_cycle_survives_collect_but_not_collect_everything() -> None:
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    assert gc_tuning.freeze_startup_heap() > 0
    del cycle
    gc.collect()
    assert alive() is not None, "frozen: an ordinary collection leaves it (so the torch backend must not)"
    gc_tuning.collect_everything()
    assert alive() is None


def test_the_clock_counts_collections_by_generation_but_not_the_freeze() -> None:
    clock = gc_tuning.GcClock()
    clock.install()
    try:
        gc.collect(0)
        young, _, old = clock.seconds()
        assert young > 0
        assert old == 0
        with clock.paused():
            gc.collect()
        assert clock.seconds()[2] == 0
        gc.collect()
        assert clock.seconds()[2] > 0
    finally:
        clock.uninstall()


def test_a_workers_metrics_export_the_collections_once_the_clock_runs() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    assert b"jetinfer_gc_seconds_total{" not in generate_latest(registry)
    gc_tuning.clock.install()
    gc.collect()
    text = generate_latest(registry).decode()
    old = [line for line in text.splitlines() if line.startswith('jetinfer_gc_seconds_total{generation="2"}')]
    assert len(old) == 1
    assert float(old[0].split()[-1]) > 0


# -- refused requests leave no reference cycles --------------------------------------------------------
# With the collector run less often, whatever only it frees lives longer: a refused request must be freed
# by reference counting, or a flood of bad requests would hold their data (up to max_msg_size each).

_CONFIG = ModelConfig(
    name="m",
    max_batch=8,
    inputs=(TensorSpec("input", "FP32", (3, 8, 8)),),
    outputs=(TensorSpec("output", "FP32", (4,)),),
    preprocess=PreprocessConfig(input="input", width=8, height=8),
)
_ACK = "$JS.ACK.INFER.worker-m.1.7.7.1700000000000000000.0"


class _Msg:
    """What prepare_request reads of a delivered message (weakly referenceable, unlike nats' Msg)."""

    def __init__(self, data: bytes, headers: dict[str, str]) -> None:
        self.subject, self.reply, self.data, self.headers = "infer.m", _ACK, data, headers


def _tensor_body(shape: list[int]) -> bytes:
    data = np.zeros(shape, np.float32).tobytes()
    return msgpack.packb(
        {"id": "r", "inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]}
    )


@pytest.mark.parametrize(
    ("data", "headers", "code"),
    [
        (b"\xc1 not msgpack", {HEADER_MSG_ID: "r"}, "invalid_input"),  # raised from msgpack's own error
        (_tensor_body([1, 3, 4, 4]), {HEADER_MSG_ID: "r"}, "invalid_input"),  # wrong shape
        (_tensor_body([9, 3, 8, 8]), {HEADER_MSG_ID: "r"}, "too_large"),  # over max_batch
        (b"x", {HEADER_MSG_ID: "r", HEADER_DEADLINE: "1"}, "deadline_exceeded"),
        (b"x", {HEADER_MSG_ID: "r", HEADER_CONTENT_TYPE: "text/plain"}, "invalid_input"),
    ],
)
def test_a_refused_request_is_freed_without_the_collector(
    data: bytes, headers: dict[str, str], code: str
) -> None:
    msg = _Msg(data, headers)
    alive = weakref.ref(msg)
    gc.disable()
    try:
        request = prepare_request(msg, _CONFIG, max_batch=8, limits=Limits())  # type: ignore[arg-type]
        assert request.error is not None
        assert request.error.code == code
        del msg, request
        assert alive() is None, "the error's traceback keeps the request in a cycle"
    finally:
        gc.enable()


def test_an_image_that_cannot_be_decoded_is_freed_without_the_collector() -> None:
    msg = _Msg(b"\xff\xd8\xff\xe0 a broken JPEG", {HEADER_MSG_ID: "r", HEADER_CONTENT_TYPE: "image/jpeg"})
    alive = weakref.ref(msg)
    gc.disable()
    try:
        request = prepare_request(msg, _CONFIG, max_batch=8, limits=Limits())  # type: ignore[arg-type]
        assert request.error is None
        CpuDecoding().decode_request(request, _CONFIG)
        assert request.error is not None
        assert request.error.code == "invalid_input"
        del msg, request
        assert alive() is None, "the decoding error's traceback keeps the request in a cycle"
    finally:
        gc.enable()
