"""`jetinfer engine-bench`: time a model called directly, with no NATS in the way.

The same backend the worker loads, on preprocessed inputs of the model's own shapes, at the batch
sizes given, with as many batches at once as the worker would run (`batch_slots`: the worker's
--parallel-batches for onnxruntime on the CPU, one on a GPU). `jetinfer bench --engine-only` runs
this in a subprocess (as the worker runs in one) and compares it with the end-to-end figures of the
same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelRepository
from jetinfer.settings import add_arguments, load_settings
from jetinfer.worker.backends.base import BackendOptions, load_backend

from .settings import EngineBenchSettings

__all__ = ["engine_bench", "register"]


def _time_calls(
    backend: Any, inputs: dict[str, Any], duration_s: float, slots: int
) -> tuple[list[float], float]:
    """Call `infer` from `slots` threads for `duration_s`; every call's latency, and the elapsed time."""
    latencies: list[float] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def loop() -> None:
        mine: list[float] = []
        while time.perf_counter() - started < duration_s or len(mine) < 5:
            t0 = time.perf_counter()
            backend.infer(inputs)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=loop, name=f"engine-bench-{i}") for i in range(slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def engine_bench(
    repository: Path,
    model: str,
    batches: list[int],
    *,
    duration_s: float = 5.0,
    device: int | None = None,
    parallel_batches: int = 0,
) -> list[dict[str, Any]]:
    """Throughput and latency of the model's newest version at each batch size.

    Batches run `backend.batch_slots` at a time, as in the worker (`parallel_batches` as its setting).
    """
    repo = ModelRepository(repository)
    version = repo.load_version(model, repo.candidates(model)[0])
    backend = load_backend(version, BackendOptions(device=device, parallel_batches=parallel_batches))
    slots = backend.batch_slots
    rng = np.random.default_rng(0)
    results = []
    too_large = [b for b in batches if b > version.config.max_batch]
    if too_large:
        limit = version.config.max_batch
        print(
            f"engine-bench: skipping batch sizes {too_large}: over {model}'s max_batch {limit}",
            file=sys.stderr,
        )
    batches = [b for b in batches if b <= version.config.max_batch]
    try:
        for batch in batches:
            inputs = {
                spec.name: rng.standard_normal((batch, *[d if d > 0 else 256 for d in spec.shape])).astype(
                    DATATYPES[spec.datatype]
                )
                for spec in version.config.inputs
            }
            for _ in range(3):
                backend.infer(inputs)
            latencies, elapsed = _time_calls(backend, inputs, duration_s, slots)
            results.append(
                {
                    "batch": batch,
                    "frames_per_s": batch * len(latencies) / elapsed,
                    "latency_ms_p50": statistics.median(latencies) * 1000,
                    "latency_ms_mean": statistics.fmean(latencies) * 1000,
                    "calls": len(latencies),
                    "batches_at_once": slots,
                    "backend": version.backend,
                    "version": version.version,
                }
            )
    finally:
        backend.close()
    return results


def register(subparsers: Any) -> None:
    """Add the `engine-bench` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "engine-bench",
        help="time a model called directly (no NATS), at several batch sizes",
        description="Load the newest version of MODEL with the worker's backend and time infer() on random "
        "inputs of the model's shapes. Prints a table, or JSON with --json.",
    )
    add_arguments(parser, EngineBenchSettings)
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    settings = load_settings(EngineBenchSettings, args)
    assert settings.repository is not None
    assert settings.model is not None
    batches = settings.batch
    if not batches:
        config = ModelRepository(settings.repository).config(settings.model)
        batches = sorted({1, config.max_batch})
    results = engine_bench(
        settings.repository,
        settings.model,
        batches,
        duration_s=settings.duration_s,
        device=settings.device,
        parallel_batches=settings.parallel_batches,
    )
    if settings.json:
        json.dump(results, sys.stdout)
        print()
        return 0
    print(f"{'batch':>6} {'at once':>8} {'frames/s':>10} {'p50 ms':>9}")
    for row in results:
        print(
            f"{row['batch']:>6} {row['batches_at_once']:>8} {row['frames_per_s']:>10.1f} "
            f"{row['latency_ms_p50']:>9.2f}"
        )
    return 0
