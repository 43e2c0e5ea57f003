"""The torch backend's static-shape CUDA path: fixed buffers, a CUDA graph per batch bucket, replay.

For a model whose inputs have no dynamic dimension but the batch: one device buffer per input
(max_batch rows) and one pinned host staging buffer per input and per output, allocated once; every
bucket warmed up (largest first) and, with graphs on, captured into one CUDA graph sharing one memory
pool, so `run` only copies in, replays and copies out: GPU memory stays flat across requests.

Waiting for a batch (`wait_for`): CUDA's default for a synchronising thread is to spin on its core
until the GPU is done, and a worker has several such threads (the engine's, the preprocessing lanes');
spinning through a 25 ms engine batch takes a core from the decoding processes. A large batch waits on
a blocking event instead (the thread sleeps); a small one spins, for its latency.

Also the per-device pool of CUDA streams: torch keeps a cuBLAS workspace (~32 MiB) for every stream
that ran a matmul, for the life of the process; reusing the streams of closed backends keeps GPU
memory flat across model reloads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from jetinfer.protocol import DATATYPES
from jetinfer.repository import TensorSpec

from . import cuda

__all__ = ["SPIN_UP_TO_FRAMES", "StaticBuckets", "acquire_stream", "return_stream", "torch_dtype", "wait_for"]

logger = logging.getLogger(__name__)

_WARMUP_RUNS = 3
_free_streams: dict[int, list[Any]] = {}
_free_streams_lock = threading.Lock()


def acquire_stream(torch: Any, device: Any) -> Any:
    """A CUDA stream on `device`: one a closed backend gave back, else a new one."""
    with _free_streams_lock:
        free = _free_streams.get(device.index)
        if free:
            return free.pop()
    return torch.cuda.Stream(device)


def return_stream(device: Any, stream: Any) -> None:
    """Give `stream` back for the next backend on `device`."""
    with _free_streams_lock:
        _free_streams.setdefault(device.index, []).append(stream)


#: Batches of at most this many frames are waited for by spinning (latency); larger ones sleep.
SPIN_UP_TO_FRAMES = 16


def wait_for(torch: Any, stream: Any, frames: int) -> None:
    """Wait until the work enqueued on `stream` for a batch of `frames` is done: spinning for a small
    batch, asleep on a blocking event for a large one (its core stays free for the decoding processes)."""
    if frames <= SPIN_UP_TO_FRAMES:
        stream.synchronize()
        return
    done = torch.cuda.Event(blocking=True)
    done.record(stream)
    done.synchronize()


def torch_dtype(torch: Any, datatype: str) -> Any:
    """The torch dtype of a wire datatype."""
    return torch.from_numpy(np.empty(0, dtype=DATATYPES[datatype])).dtype


#: Runs the program on device tensors; returns the outputs in the config's order.
Forward = Callable[[Sequence[Any]], list[Any]]


class StaticBuckets:
    """Buffers, warm-up and CUDA graphs of the batch buckets of one loaded program on one stream."""

    def __init__(
        self,
        torch: Any,
        device: Any,
        stream: Any,
        *,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        buckets: Sequence[int],
        forward: Forward,
        check_outputs: Callable[[Sequence[Any], int], None],
    ) -> None:
        self._torch = torch
        self._device = device
        self._stream = stream
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._buckets = tuple(buckets)
        self._forward = forward
        self._check_outputs = check_outputs
        self._device_in: list[Any] = []  # one (max_batch, ...) device buffer per input
        self._pinned_in: list[Any] = []  # one (max_batch, ...) pinned buffer per input
        self._pinned_in_np: list[npt.NDArray[Any]] = []
        self._pinned_out: list[Any] = []  # one (max_batch, ...) pinned buffer per output
        self._pinned_out_np: list[npt.NDArray[Any]] = []
        self._graphs: dict[int, Any] = {}  # bucket -> torch.cuda.CUDAGraph
        self._graph_outputs: dict[int, list[Any]] = {}  # bucket -> the graph's static outputs

    @property
    def graph_count(self) -> int:
        """How many CUDA graphs are captured."""
        return len(self._graphs)

    def prepare(self, *, graphs: bool) -> None:
        """Allocate the buffers, warm up every bucket (checking its outputs), capture graphs if asked."""
        torch, device, max_batch = self._torch, self._device, self._buckets[-1]
        with torch.cuda.device(device):
            for spec in self._inputs:
                dtype = torch_dtype(torch, spec.datatype)
                self._device_in.append(torch.zeros((max_batch, *spec.shape), dtype=dtype, device=device))
                pinned = torch.zeros((max_batch, *spec.shape), dtype=dtype, pin_memory=True)
                self._pinned_in.append(pinned)
                self._pinned_in_np.append(pinned.numpy())
            torch.cuda.synchronize(device)
            with torch.cuda.stream(self._stream), torch.inference_mode():
                for bucket in reversed(self._buckets):
                    for _ in range(_WARMUP_RUNS):
                        outputs = self._forward([buffer[:bucket] for buffer in self._device_in])
                    self._check_outputs(outputs, bucket)
                    if bucket == max_batch:
                        for output in outputs:
                            pinned = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
                            self._pinned_out.append(pinned)
                            self._pinned_out_np.append(pinned.numpy())
            self._stream.synchronize()
            if graphs:
                self._capture()

    def _capture(self) -> None:
        torch = self._torch
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bucket in reversed(self._buckets):  # largest first: the smaller ones fit in its memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(
                    graph, pool=pool, stream=self._stream, capture_error_mode="thread_local"
                ):
                    outputs = self._forward([buffer[:bucket] for buffer in self._device_in])
                self._graphs[bucket] = graph
                self._graph_outputs[bucket] = outputs
        self._stream.synchronize()

    def run(self, inputs: dict[str, Any], batch: int) -> dict[str, npt.NDArray[Any]]:
        """One batch: copy in (host arrays staged through pinned memory, GPU tensors directly), replay
        (or run) its bucket, copy out. Call on the stream's device, in inference mode."""
        torch = self._torch
        bucket = next(b for b in self._buckets if b >= batch)
        for spec, staged, pinned, device_buffer in zip(
            self._inputs, self._pinned_in_np, self._pinned_in, self._device_in, strict=True
        ):
            value = inputs[spec.name]
            if isinstance(value, torch.Tensor) and value.is_cuda:
                device_buffer[:batch].copy_(value, non_blocking=True)  # device to device, with the cast
                continue
            cuda.stage(staged[:batch], value)
            device_buffer[:batch].copy_(pinned[:batch], non_blocking=True)
        graph = self._graphs.get(bucket)
        if graph is not None:
            graph.replay()
            outputs = self._graph_outputs[bucket]
        else:
            outputs = self._forward([buffer[:bucket] for buffer in self._device_in])
        for output, pinned in zip(outputs, self._pinned_out, strict=True):
            pinned[:batch].copy_(output[:batch], non_blocking=True)
        wait_for(torch, self._stream, batch)
        return {
            spec.name: staged[:batch].copy()
            for spec, staged in zip(self._outputs, self._pinned_out_np, strict=True)
        }

    def release(self) -> None:
        """Free the graphs and buffers (failures logged). Safe to call twice."""
        for graph in self._graphs.values():
            try:
                graph.reset()
            except Exception:
                logger.exception("torch: releasing a CUDA graph failed")
        self._graphs.clear()
        self._graph_outputs.clear()
        for buffers in (
            self._device_in,
            self._pinned_in,
            self._pinned_in_np,
            self._pinned_out,
            self._pinned_out_np,
        ):
            buffers.clear()
