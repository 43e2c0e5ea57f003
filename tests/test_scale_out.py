"""Several workers share one stream and consumer: every request answered once, the work divided (issue 8)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np

from jetinfer.producer.client import Client
from tests.conftest import NatsUnderTest, running_worker, wait_until_answered


def answered(worker: Any, model: str) -> int:
    """Requests a worker answered ok, from its own metrics registry."""
    labels = {"model": model, "version": "1", "status": "ok"}
    return int(worker.registry.get_sample_value("jetinfer_requests_total", labels) or 0)


async def test_two_workers_share_one_consumer_with_nothing_lost_or_doubled(
    nats_server: NatsUnderTest, model_repo: Any
) -> None:
    repo, model = model_repo("identity")
    requests = 1000
    payloads = [np.full((1, 16), index, dtype=np.float32) for index in range(requests)]
    async with (
        running_worker(nats_server.url, repo, [model], worker_id="worker-a") as first,
        running_worker(nats_server.url, repo, [model], worker_id="worker-b") as second,
        Client(nats_server.url) as client,
    ):
        semaphore = asyncio.Semaphore(64)

        async def one(payload: np.ndarray[Any, Any]) -> Any:
            async with semaphore:
                return await client.infer(model, payload, timeout=60)

        replies = await asyncio.gather(*(one(p) for p in payloads))
        await wait_until_answered(client.js, model)  # a request is counted after its reply and ack
        served = Counter({name: answered(worker, model) for name, worker in (("a", first), ("b", second))})
    values = [int(reply.output()[0, 0]) for reply in replies]
    assert values == list(range(requests)), "a reply does not match its request"
    assert client.duplicates_dropped == 0
    assert served["a"] + served["b"] == requests, f"served {dict(served)} for {requests} requests"
    assert served["a"] > 0
    assert served["b"] > 0
