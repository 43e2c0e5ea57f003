"""`--fronts K`: front processes pull, prepare and answer on connections of their own, and the worker's
process runs their batches (issue 14: past one event loop's messages a second)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from jetinfer.embedded import free_port
from jetinfer.errors import RequestError
from jetinfer.labels import top_k
from jetinfer.producer.client import Client
from jetinfer.worker.front_link import (
    BatchDone,
    Hello,
    MetricsSnapshot,
    RemoteRequest,
    RunBatch,
    WireError,
    decode,
    encode,
)
from jetinfer.worker.settings import WorkerSettings
from tests.conftest import CAT_CLASSES, NatsUnderTest, running_worker, wait_until_answered
from tests.test_metrics import scrape


async def _metric(port: int, name: str, **labels: str) -> float:
    """A sample of the worker's /metrics (its own and its fronts' summed), 0 where it has none."""
    for sample in await scrape(port):
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return 0.0


async def _until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what}")
        await asyncio.sleep(0.05)


def test_every_link_message_crosses_unchanged() -> None:
    settings = WorkerSettings(model=["m"], fronts=2, nats_creds_file=None)
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    request = RemoteRequest("r1", 1.5, None, 3, "image/jpeg", (b"\xff\xd8\xff",), {"x": array}, False)
    for message in (
        Hello(settings, 2, 20),
        RunBatch("m", 7, (request,)),
        BatchDone(7, "3", 1.0, 0.25, ({"y": array}, WireError("invalid_input", "bad"))),
        MetricsSnapshot(
            (("jetinfer_requests", "counter", "doc", (("jetinfer_requests_total", {"a": "b"}, 2.0),)),)
        ),
    ):
        back = decode(encode(message))
        if isinstance(message, RunBatch):
            assert isinstance(back, RunBatch)
            np.testing.assert_array_equal(back.requests[0].inputs["x"], array)
            assert back.requests[0].encoded == request.encoded
        elif isinstance(message, BatchDone):
            assert isinstance(back, BatchDone)
            first, second = back.results
            assert isinstance(first, dict)
            np.testing.assert_array_equal(first["y"], array)
            assert isinstance(second, WireError)
            assert isinstance(second.error(), RequestError)
            assert second.error().code == "invalid_input"
        else:
            assert back == message
    with pytest.raises(ConnectionError, match="does not know"):
        decode({"t": "exec", "code": "rm -rf /"})


async def test_fronts_answer_images_and_tensors_and_count_them_on_one_metrics(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    tensors = 40
    port = free_port()
    async with (
        running_worker(
            nats_server.url, repo, [model], fronts=2, metrics_port=port, metrics_host="127.0.0.1"
        ) as worker,
        Client(nats_server.url) as client,
    ):
        assert worker.fronts is not None
        assert worker.servers == {}  # nothing pulled in this process
        await _until(lambda: worker.readiness()[0], 30, "every front to serve the model")
        assert [f["serving"] for f in worker.readiness()[1]["fronts"]] == [[model], [model]]
        by_jpeg = await client.infer(model, cat_jpeg, timeout=60)
        rng = np.random.default_rng(3)
        inputs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(tensors)]
        replies = await asyncio.gather(*(client.infer(model, x, timeout=60) for x in inputs))
        await wait_until_answered(client.js, model)
        await asyncio.sleep(1.5)  # a front's metrics reach the worker's /metrics once a second
        counted = await _metric(port, "jetinfer_requests_total", model=model, status="ok")
        batches = await _metric(port, "jetinfer_batch_size_count", model=model)
    top5 = {p.index for p in top_k(by_jpeg.output("logits")[0], k=5)}
    assert top5 & CAT_CLASSES, f"no cat in top-5 {top5}"
    assert all(r.output("logits").shape == (1, 1000) for r in replies)
    assert counted == tensors + 1, "each request counted once, by the front that settled it"
    assert batches >= 1, "the engine counts the batches it ran"
