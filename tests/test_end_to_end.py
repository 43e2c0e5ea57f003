"""A request published to JetStream is answered by a worker running a real model (issue 2)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from jetinfer.labels import top_k
from jetinfer.producer.client import Client
from jetinfer.repository import ModelRepository
from tests.conftest import CAT_CLASSES, NatsUnderTest, running_worker


async def test_cat_jpeg_and_tensor_come_back_as_a_cat(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    config = ModelRepository(repo).config(model)
    assert config.preprocess is not None
    from jetinfer.images import preprocess_image

    tensor = preprocess_image(cat_jpeg, config.preprocess)
    async with running_worker(nats_server.url, repo, [model]), Client(nats_server.url) as client:
        by_jpeg = await client.infer(model, cat_jpeg, timeout=60)
        by_tensor = await client.infer(model, tensor, timeout=60)
    for reply in (by_jpeg, by_tensor):
        assert reply.model_name == model
        assert reply.model_version == "1"
        logits = reply.output("logits")
        assert logits.shape == (1, 1000)
        top5 = {p.index for p in top_k(logits[0], k=5)}
        assert top5 & CAT_CLASSES, f"no cat in top-5 {top5}"
        assert {"queue_ms", "infer_ms", "total_ms"} <= set(reply.timing)
    # The two paths preprocess identically, so the logits agree.
    np.testing.assert_allclose(by_jpeg.output(), by_tensor.output(), rtol=1e-4, atol=1e-4)


async def test_concurrent_requests_are_micro_batched_and_each_reply_matches(
    nats_server: NatsUnderTest, model_repo: Any
) -> None:
    repo, model = model_repo("identity")
    requests = 300
    rng = np.random.default_rng(7)
    payloads = [rng.standard_normal((1, 256)).astype(np.float32) for _ in range(requests)]
    async with (
        running_worker(nats_server.url, repo, [model], max_wait_ms=2.0) as worker,
        Client(nats_server.url) as client,
    ):
        replies = await asyncio.gather(*(client.infer(model, p, timeout=60) for p in payloads))
        batches = worker.servers[model].batches_run
    for payload, reply in zip(payloads, replies, strict=True):
        np.testing.assert_array_equal(reply.output(), payload)
    assert batches < requests, f"{requests} requests ran in {batches} batches: no micro-batching"
    assert client.duplicates_dropped == 0


async def test_multi_frame_request_keeps_frame_order(nats_server: NatsUnderTest, model_repo: Any) -> None:
    repo, model = model_repo("identity")
    frames = np.arange(8 * 256, dtype=np.float32).reshape(8, 256)
    async with running_worker(nats_server.url, repo, [model]), Client(nats_server.url) as client:
        replies = await asyncio.gather(
            client.infer(model, frames, timeout=30), client.infer(model, frames[:3] * -1, timeout=30)
        )
    np.testing.assert_array_equal(replies[0].output(), frames)
    np.testing.assert_array_equal(replies[1].output(), frames[:3] * -1)


async def test_sync_client(nats_server: NatsUnderTest, model_repo: Any) -> None:
    from jetinfer.producer.sync import SyncClient

    repo, model = model_repo("identity")
    data = np.linspace(0, 1, 256, dtype=np.float32)[None]
    async with running_worker(nats_server.url, repo, [model]):

        def call() -> Any:
            with SyncClient(nats_server.url) as client:
                return client.infer(model, data, timeout=30)

        reply = await asyncio.to_thread(call)
    np.testing.assert_array_equal(reply.output(), data)


async def test_unknown_model_fails_fast(nats_server: NatsUnderTest) -> None:
    from jetinfer.errors import UnknownModelError

    async with Client(nats_server.url) as client:
        with pytest.raises(UnknownModelError, match="no worker has registered"):
            await asyncio.wait_for(
                client.infer("never-registered", np.zeros((1, 4), np.float32), timeout=30), 5
            )
