"""Self-configuration: what this worker process has, and what it chooses where the settings leave it open.

A Kubernetes pod gets one GPU and a CPU quota; one `jetinfer serve` must use both fully with no tuning
flags. So at start the worker reads the cores it may use (its CPU affinity and the cgroup's CPU quota,
not the node's `os.cpu_count()`), and per model, once a version is loaded, whether the backend runs on
a GPU and whether the model takes images. From those it chooses (`plan`):

- GPU backend, image model: decoding processes on the cores left after the event loop and the GPU's
  feeding threads, split into two lanes, so two batches are decoded while the engine runs a third; small
  JPEG batches (a lone request) decode on the GPU where torchvision can; uint8 pixels normalised on the
  GPU; the GIL handed over every millisecond (the threads feeding the GPU wait for it otherwise). Where
  the processes cannot keep up with the engine (both measured at start, `probe_rates`), one to three
  more lanes decode whole JPEG batches on the GPU: with nvJPEG on the SMs (each lane past the first
  taking a core from the processes), or with `--nvimgcodec` on its hardware JPEG engine (no SM time
  taken from the model; timed at start too).
- CPU backend (or a tensor model): decode threads and ONNX Runtime's intra-op threads sized to the cores.

Every choice is a setting; one given on the command line or in the environment wins. `Plan.describe()`
is the one log line that says what was chosen and why.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from jetinfer.images import decode_pixels
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelConfig

from .backends.base import Backend
from .gpu_decode import hardware_jpeg_rate
from .settings import WorkerSettings

__all__ = ["Plan", "Rates", "plan", "probe_rates", "usable_cores"]

#: Cores a GPU worker keeps for its event loop and the threads that feed the GPU (not for decoding).
GPU_RESERVED_CORES = 2
#: Batches made ahead at once on a GPU: two keep the engine busy while one batch's images decode.
GPU_LANES = 2
#: The GIL switch interval a GPU worker uses (Python's default is 5 ms).
GPU_GIL_SWITCH_MS = 1.0
#: The share of one process's decoding rate (one JPEG, measured alone) that each decoding process gives
#: under load: on the H200 machine 8 processes decoded 8.9k-10.0k img/s alone where one decodes 2.8k,
#: and less beside the worker (docs/benchmarks.md). 0.6 had the plan choose no GPU lane in some runs.
DECODE_EFFICIENCY = 0.4
#: The most nvJPEG lanes beside the processes: one per multiple of the processes' images/s the engine
#: takes. On the H200 machine a light engine drained its stream at least as fast with 6 processes and 3
#: lanes as with 8 and 2, and faster than with 8 and 3 (docs/benchmarks.md, session 7).
MAX_GPU_DECODE_LANES = 3
#: The decoding probe: JPEGs decoded before timing, then the best of this many.
_DECODE_WARMUP = 30
_DECODE_TIMINGS = 100


@dataclass(frozen=True)
class Rates:
    """What the worker measured at start: the engine's images/s at max_batch, one process's images/s
    decoding the model's input (a JPEG of its size), and the GPU's hardware JPEG engine's images/s at
    max_batch (None: there is none to use)."""

    engine: float
    decode_per_process: float
    hardware_decode: float | None = None


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(cores this process may use, where that number comes from): affinity, capped by a cgroup quota."""
    try:
        cores, why = len(os.sched_getaffinity(0)), "CPU affinity"
    except (AttributeError, OSError):
        cores, why = os.cpu_count() or 1, "os.cpu_count()"
    quota = _cgroup_quota(cgroup_root)
    if quota is not None and quota < cores:
        return max(1, math.floor(quota)), f"cgroup CPU quota {quota:g}"
    return max(1, cores), why


def _cgroup_quota(root: Path) -> float | None:
    """The cgroup's CPU quota in cores (v2 cpu.max, else v1 cfs quota/period); None where unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


@dataclass(frozen=True)
class Plan:
    """One model server's choices, each either set or chosen."""

    gpu_decode: bool
    gpu_normalise: bool
    decode_processes: int
    lanes: int
    gpu_lanes: int
    hardware_lanes: bool  # the gpu_lanes decode on the hardware JPEG engine (nvImageCodec)
    decode_threads: int
    pipeline_depth: int
    gil_switch_ms: float  # 0: leave Python's
    reasons: tuple[str, ...]

    def describe(self) -> str:
        """What was chosen, and why, in one line."""
        return "; ".join(self.reasons)


def plan(
    settings: WorkerSettings,
    config: ModelConfig,
    *,
    on_gpu: bool,
    cores: int,
    cores_why: str,
    rates: Rates | None = None,
) -> Plan:
    """The choices for a model with `config` whose backend runs on a GPU (`on_gpu`) or not; `rates`,
    where measured, says whether the decoding processes can keep up with the engine."""
    reasons = [f"{cores} cores ({cores_why})"]
    images = config.preprocess is not None
    threads = settings.decode_workers or cores
    if not (on_gpu and images):
        reasons.append("GPU backend, tensor model" if on_gpu else "CPU backend")
        reasons.append(f"{threads} decode threads")
        return Plan(
            gpu_decode=bool(settings.gpu_decode),
            gpu_normalise=bool(settings.gpu_normalise),
            decode_processes=settings.decode_processes or 0,
            lanes=settings.preprocess_lanes or 1,
            gpu_lanes=settings.gpu_decode_lanes or 0,
            hardware_lanes=settings.nvimgcodec,
            decode_threads=threads,
            pipeline_depth=settings.pipeline_depth or 1,
            gil_switch_ms=settings.gil_switch_ms or 0.0,
            reasons=tuple(reasons),
        )
    reasons.append("GPU backend, image model")
    # --gpu-decode alone keeps its meaning: every JPEG decoded on the GPU, nothing else added.
    only_gpu_decode = (
        settings.gpu_decode is True and settings.gpu_normalise is None and not settings.decode_processes
    )
    gpu_normalise = (not only_gpu_decode) if settings.gpu_normalise is None else settings.gpu_normalise
    if settings.decode_processes is not None:
        processes = settings.decode_processes
    else:
        processes = max(0, cores - GPU_RESERVED_CORES) if gpu_normalise else 0
        if processes:
            reasons.append(f"{processes} decoding processes (the cores less {GPU_RESERVED_CORES})")
    if settings.gpu_decode is not None:
        gpu_decode = settings.gpu_decode
    else:
        gpu_decode = importlib.util.find_spec("torchvision") is not None
        reasons.append("small JPEG batches on the GPU" if gpu_decode else "no torchvision: JPEGs on the CPU")
    lanes = settings.preprocess_lanes or (GPU_LANES if processes >= GPU_LANES or not processes else 1)
    hardware = rates.hardware_decode if rates is not None and settings.nvimgcodec else None
    gpu_lanes = settings.gpu_decode_lanes
    if gpu_lanes is None:
        gpu_lanes = 0
        if rates is not None and processes and (gpu_decode or hardware):
            decoding = processes * rates.decode_per_process * DECODE_EFFICIENCY
            short = rates.engine - decoding
            measured = f"engine {rates.engine:,.0f} img/s, {processes} processes decode about {decoding:,.0f}"
            if hardware:
                gpu_lanes = 0 if short <= 0 else 1 if short <= hardware / 2 else 2
                reasons.append(
                    f"{measured}, the JPEG engine {hardware:,.0f}: {gpu_lanes} lane(s) decoding JPEG "
                    "batches on the GPU's JPEG engine beside them"
                )
            else:
                gpu_lanes = 0 if short <= 0 else min(MAX_GPU_DECODE_LANES, int(rates.engine // decoding))
                reasons.append(
                    f"{measured}: {gpu_lanes} lane(s) decoding JPEG batches on the GPU beside them"
                )
    if settings.decode_processes is None and gpu_lanes > 1 and not settings.nvimgcodec:
        # nvJPEG's Huffman decoding runs on its lane's thread: a core there decodes several times the
        # images a Pillow process does, so each lane past the first takes one from the processes.
        given = min(gpu_lanes - 1, processes - GPU_LANES)
        if given > 0:
            processes -= given
            reasons.append(f"{processes} decoding processes ({given} core(s) left to the GPU lanes)")
    depth = settings.pipeline_depth or lanes + gpu_lanes
    switch = GPU_GIL_SWITCH_MS if settings.gil_switch_ms is None else settings.gil_switch_ms
    reasons.append(f"{lanes} lane(s), {depth} batch(es) made ahead, GIL switch {switch:g} ms")
    return Plan(
        gpu_decode=gpu_decode,
        gpu_normalise=gpu_normalise or processes > 0,
        decode_processes=processes,
        lanes=lanes,
        gpu_lanes=gpu_lanes,
        hardware_lanes=settings.nvimgcodec,
        decode_threads=threads,
        pipeline_depth=depth,
        gil_switch_ms=switch,
        reasons=tuple(reasons),
    )


def probe_rates(
    backend: Backend,
    config: ModelConfig,
    max_batch: int,
    *,
    hardware: bool = False,
    device: int | None = None,
) -> Rates:
    """Time the engine on a batch of zeros at `max_batch` (best of three), this process decoding a JPEG
    of the model's input size (best of 100, after 30 untimed) and, with `hardware`, the GPU's hardware
    JPEG engine on `max_batch` of them. Blocking: a few hundred milliseconds (the engine's first use, a
    second more)."""
    assert config.preprocess is not None, "rates are for image models"
    batch = {
        spec.name: np.zeros(
            (max_batch, *[d if d > 0 else 1 for d in spec.shape]), dtype=DATATYPES[spec.datatype]
        )
        for spec in config.inputs
    }
    engine = min(_timed(lambda: backend.infer(batch)) for _ in range(3))
    probe = _probe_jpeg(config.preprocess.width, config.preprocess.height)
    decode_probe = functools.partial(decode_pixels, probe, config.preprocess)
    for _ in range(_DECODE_WARMUP):  # a core that was idle decodes slower until its clock is up
        decode_probe()
    decode = min(_timed(decode_probe) for _ in range(_DECODE_TIMINGS))
    jpeg_engine = (
        hardware_jpeg_rate(config.preprocess, probe, frames=max_batch, device=device) if hardware else None
    )
    return Rates(engine=max_batch / engine, decode_per_process=1.0 / decode, hardware_decode=jpeg_engine)


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return max(1e-9, time.perf_counter() - started)


def _probe_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG (smooth gradients and noise) of width x height, quality 90."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack(
        [x * 255 // max(1, width), y * 255 // max(1, height), (x + y) * 127 // max(1, width)], -1
    )
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
