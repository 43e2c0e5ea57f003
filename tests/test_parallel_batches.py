"""Several batches at once on a CPU backend: onnxruntime shares the cores, replies stay right.

The end-to-end tests (tests/test_end_to_end.py) run the worker with its default of two batches
at once for onnxruntime; these check the backend and engine-bench pieces directly.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from jetinfer.repository import ModelRepository
from worker.backends.base import load_backend
from worker.engine_bench import engine_bench


def test_onnxruntime_on_the_cpu_runs_two_batches_at_once_by_default(model_repo: Any) -> None:
    repo, name = model_repo("identity")
    version = ModelRepository(repo).load_version(name, 1)
    with load_backend(version) as default, load_backend(version, parallel_batches=1) as single:
        assert default.batch_slots == 2
        assert single.batch_slots == 1
    with load_backend(version, parallel_batches=3) as three:
        assert three.batch_slots == 3


def test_concurrent_batches_each_get_their_own_answer(model_repo: Any) -> None:
    """Four threads hammer one session at once; every output is its own input (identity model)."""
    repo, name = model_repo("identity")
    version = ModelRepository(repo).load_version(name, 1)
    input_name = version.config.inputs[0].name
    output_name = version.config.outputs[0].name
    mismatches: list[int] = []
    with load_backend(version, parallel_batches=4) as backend:

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
    default = engine_bench(repo, name, [1, 8], duration_s=0.2)
    single = engine_bench(repo, name, [8], duration_s=0.2, parallel_batches=1)
    assert [row["batches_at_once"] for row in default] == [2, 2]
    assert [row["batch"] for row in default] == [1, 8]
    assert single[0]["batches_at_once"] == 1
    assert all(row["frames_per_s"] > 0 and row["calls"] >= 5 for row in default + single)
