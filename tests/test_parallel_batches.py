"""Several batches at once on a CPU backend: onnxruntime shares the cores, replies stay right.

One batch at a time is the default (a lone request gets every core); `--parallel-batches 2` runs
two. The worker test serves 300 concurrent requests that way; the others check the backend and
engine-bench pieces directly.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

from jetinfer.bench.engine import engine_bench
from jetinfer.producer.client import Client
from jetinfer.repository import ModelRepository
from jetinfer.worker.backends.base import BackendOptions, load_backend
from tests.conftest import NatsUnderTest, running_worker


def test_onnxruntime_on_the_cpu_runs_batches_as_the_setting_says(model_repo: Any) -> None:
    repo, name = model_repo("identity")
    version = ModelRepository(repo).load_version(name, 1)
    with load_backend(version) as default, load_backend(version, BackendOptions(parallel_batches=2)) as two:
        assert default.batch_slots == 1
        assert two.batch_slots == 2
    with load_backend(version, BackendOptions(parallel_batches=3)) as three:
        assert three.batch_slots == 3


def test_concurrent_batches_each_get_their_own_answer(model_repo: Any) -> None:
    """Four threads hammer one session at once; every output is its own input (identity model)."""
    repo, name = model_repo("identity")
    version = ModelRepository(repo).load_version(name, 1)
    input_name = version.config.inputs[0].name
    output_name = version.config.outputs[0].name
    mismatches: list[int] = []
    with load_backend(version, BackendOptions(parallel_batches=4)) as backend:

        def run(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(50):
                batch = rng.standard_normal((int(rng.integers(1, 32)), 256)).astype(np.float32)
                out = backend.infer({input_name: batch})[output_name]
                if not np.array_equal(out, batch):
                    mismatches.append(seed)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert mismatches == []


def test_engine_bench_runs_as_many_batches_at_once_as_the_worker(model_repo: Any) -> None:
    repo, name = model_repo("identity")
    two = engine_bench(repo, name, [1, 8], duration_s=0.2, parallel_batches=2)
    single = engine_bench(repo, name, [8], duration_s=0.2)
    assert [row["batches_at_once"] for row in two] == [2, 2]
    assert [row["batch"] for row in two] == [1, 8]
    assert single[0]["batches_at_once"] == 1
    assert all(row["frames_per_s"] > 0 and row["calls"] >= 5 for row in two + single)


async def test_a_worker_running_two_batches_at_once_answers_every_request_right(
    nats_server: NatsUnderTest, model_repo: Any
) -> None:
    repo, model = model_repo("identity")
    rng = np.random.default_rng(11)
    payloads = [rng.standard_normal((int(rng.integers(1, 4)), 256)).astype(np.float32) for _ in range(300)]
    async with (
        running_worker(nats_server.url, repo, [model], parallel_batches=2) as worker,
        Client(nats_server.url) as client,
    ):
        replies = await asyncio.gather(*(client.infer(model, p, timeout=60) for p in payloads))
        server = worker.servers[model]
    assert server.batch_slots == 2
    for payload, reply in zip(payloads, replies, strict=True):
        np.testing.assert_array_equal(reply.output(), payload)
    assert server.batches_run < len(payloads)
    assert client.duplicates_dropped == 0
