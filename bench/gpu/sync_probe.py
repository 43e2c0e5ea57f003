"""How a thread waiting for the GPU costs the decoding processes their cores, and what a high-priority
preprocessing stream buys: timed on the machine it runs on.

    python bench/gpu/sync_probe.py REPOSITORY MODEL [--seconds 3] [--processes 8]

With the model's engine (`load_backend`, as the worker loads it) running batches of max_batch in a
thread, prints for each way of waiting (spinning, as CUDA does by default, and asleep on a blocking
event, as `wait_for` does for large batches): the engine thread's CPU ms per batch, the engine's
images/s, and the decoding processes' images/s beside it (`ProcessDecoder`, batches of max_batch of the
cat photo). Then the engine beside an nvJPEG lane decoding batches in another thread, with the lane's
stream at normal and at high priority: both rates.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jetinfer.bench.load import _cat_jpeg
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelRepository
from jetinfer.worker.backends import torch_buckets
from jetinfer.worker.backends.base import BackendOptions, load_backend
from jetinfer.worker.decode_processes import ProcessDecoder
from jetinfer.worker.gpu_decode import GpuJpegDecoder


def main() -> None:
    """Print one line per configuration."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repository", type=Path)
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=8)
    args = parser.parse_args()
    repository = ModelRepository(args.repository)
    version = repository.load_version(args.model, repository.candidates(args.model)[0])
    backend = load_backend(version, BackendOptions())
    config = version.config
    assert config.preprocess is not None, "an image model"
    max_batch = config.max_batch
    batch = {
        spec.name: np.zeros((max_batch, *spec.shape), dtype=DATATYPES[spec.datatype])
        for spec in config.inputs
    }
    images = [_cat_jpeg(224)] * max_batch
    decoder = ProcessDecoder(config.preprocess, processes=args.processes, max_frames=max_batch)

    def decode() -> int:
        with decoder.decode(images, config.preprocess):  # type: ignore[arg-type]
            return max_batch

    rate, _ = _rate(decode, args.seconds)
    print(f"{args.processes} decoding processes alone: {rate:,.0f} img/s")
    spin_default = torch_buckets.SPIN_UP_TO_FRAMES
    for name, spin_up_to in (("spinning", 1 << 30), ("blocking event", spin_default)):
        torch_buckets.SPIN_UP_TO_FRAMES = spin_up_to
        engine_rate, cpu_ms = _rate(lambda: _infer(backend, batch, max_batch), args.seconds)
        (engine_beside, cpu_beside), (decode_beside, _) = _together(
            lambda: _infer(backend, batch, max_batch), decode, args.seconds
        )
        print(
            f"engine waits {name}: engine alone {engine_rate:,.0f} img/s ({cpu_ms:.1f} ms CPU a batch); "
            f"beside the processes: engine {engine_beside:,.0f} img/s ({cpu_beside:.1f} ms CPU a batch), "
            f"processes {decode_beside:,.0f} img/s"
        )
    torch_buckets.SPIN_UP_TO_FRAMES = spin_default
    decoder.close()
    gpu = GpuJpegDecoder(config.preprocess, max_frames=max_batch)
    torch: Any = __import__("torch")
    for priority in (0, -1):
        gpu._normaliser.stream = torch.cuda.Stream(device=gpu.device, priority=priority)

        def decode_on_gpu() -> int:
            gpu.decode(images)
            return max_batch

        alone, _ = _rate(decode_on_gpu, args.seconds)
        (engine_beside, _), (decode_beside, lane_cpu) = _together(
            lambda: _infer(backend, batch, max_batch), decode_on_gpu, args.seconds
        )
        print(
            f"nvJPEG lane, stream priority {priority}: alone {alone:,.0f} img/s; beside the engine: engine "
            f"{engine_beside:,.0f} img/s, lane {decode_beside:,.0f} img/s ({lane_cpu:.1f} ms CPU a batch)"
        )
    backend.close()


def _infer(backend: Any, batch: dict[str, Any], frames: int) -> int:
    backend.infer(batch)
    return frames


def _rate(call: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(images/s of `call` in this thread, its CPU ms per call), after one call of warm-up."""
    call()
    done, calls = 0, 0
    started, cpu = time.perf_counter(), time.thread_time()
    while time.perf_counter() - started < seconds:
        done += call()
        calls += 1
    return done / (time.perf_counter() - started), (time.thread_time() - cpu) / calls * 1e3


def _together(
    first: Callable[[], int], second: Callable[[], int], seconds: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """`_rate` of two calls at once, each in its own thread."""
    results: dict[int, tuple[float, float]] = {}

    def one(index: int, call: Callable[[], int]) -> None:
        results[index] = _rate(call, seconds)

    threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results[0], results[1]


if __name__ == "__main__":
    main()
