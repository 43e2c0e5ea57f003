"""Prometheus metrics of a worker, in one class that takes the registry (so tests get their own).

Names follow `jetinfer_<noun>_{total|seconds|bytes}`: counters end in `_total`, durations in
`_seconds`, sizes in `_bytes`. Unitless values carry no unit suffix, as Prometheus' naming guide
says: `jetinfer_batch_size` (frames per batch), `jetinfer_consumer_lag` (messages),
`jetinfer_inflight_requests` (requests), and `jetinfer_gpu_utilization_ratio` takes Prometheus' `_ratio`
for a 0..1 fraction. Labels are drawn from the fixed set (`model`, `version`, `status`), plus `gpu`
(the NVML device index) on the GPU gauges, which have no series at all where no GPU is found, and
`stage` and `activity` on `jetinfer_stage_seconds_total` (their values: `jetinfer.worker.stage_clock`).
`version` is empty for requests refused before a version ran them (undecodable, expired).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import gc_tuning

__all__ = ["GpuProbe", "WorkerMetrics"]

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class WorkerMetrics:
    """Every metric a worker exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        registry.register(gc_tuning.clock)  # jetinfer_gc_seconds_total, once `jetinfer serve` installs it
        self.requests = Counter(
            "jetinfer_requests",
            "Requests answered, by outcome (ok or an error code)",
            ["model", "version", "status"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "jetinfer_batch_size",
            "Frames per inference batch",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "jetinfer_queue_wait_seconds",
            "Time from the JetStream publish to the start of inference",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "jetinfer_inference_seconds",
            "Backend time per batch",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "jetinfer_request_duration_seconds",
            "Time from the JetStream publish to the reply",
            ["model", "version", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.replies_refused = Counter(
            "jetinfer_replies_refused",
            "Replies the NATS server would not take (reply_refused: no permission; too_large: max_payload)",
            ["model", "version", "status"],
            registry=registry,
        )
        self.front_restarts = Counter(
            "jetinfer_front_restarts",
            "Front processes (--fronts) started again after one died",
            registry=registry,
        )
        self.inflight = Gauge(
            "jetinfer_inflight_requests",
            "Requests fetched and not yet acknowledged",
            ["model"],
            registry=registry,
        )
        self.reloads = Counter(
            "jetinfer_reloads",
            "Model version loads, by outcome (loaded or refused)",
            ["model", "version", "status"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "jetinfer_consumer_lag",
            "num_pending + num_ack_pending of the consumer worker-<model>",
            ["model"],
            registry=registry,
        )
        self.oldest_request_age = Gauge(
            "jetinfer_oldest_request_age_seconds",
            "Age of the oldest request still in the stream",
            ["model"],
            registry=registry,
        )
        self.stage_time = Counter(
            "jetinfer_stage_seconds",
            "Seconds each pipeline stage spent on each activity (where a busy worker waits)",
            ["model", "stage", "activity"],
            registry=registry,
        )
        self.gpu_utilization = Gauge(
            "jetinfer_gpu_utilization_ratio", "GPU utilisation (0..1) from NVML", ["gpu"], registry=registry
        )
        self.gpu_memory_used = Gauge(
            "jetinfer_gpu_memory_used_bytes", "GPU memory in use from NVML", ["gpu"], registry=registry
        )


class GpuProbe:
    """Reads GPU utilisation and memory through NVML where a GPU and nvidia-ml-py are present.

    Without NVML, a driver or a GPU, `available` is False and `update` sets nothing, so the GPU
    gauges stay absent rather than reading a misleading zero.
    """

    def __init__(self, nvml: Any = None) -> None:
        """`nvml`: the `pynvml` module (nvidia-ml-py), imported when not given."""
        self._handles: list[tuple[str, Any]] = []
        self._nvml: Any = None
        self._warned: set[tuple[str, str]] = set()
        try:
            if nvml is None:
                nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
        except Exception as exc:  # no nvidia-ml-py, no driver: the gauges stay absent
            logger.debug("NVML unavailable: %s", exc)
            return
        self._nvml = nvml
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                self._handles.append((str(index), nvml.nvmlDeviceGetHandleByIndex(index)))
        except Exception as exc:
            logger.warning("NVML found no usable GPU: %s", exc)
            self._handles = []
        if not self._handles:
            self.close()

    @property
    def available(self) -> bool:
        """Whether any GPU was found."""
        return bool(self._handles)

    def update(self, metrics: WorkerMetrics) -> None:
        """Set the GPU gauges (blocking NVML calls: run in a thread).

        A reading NVML refuses (utilisation is not supported on a MIG slice, for one) leaves that
        gauge absent (not stale) for that GPU; it is logged once as a warning, then at debug level.
        """
        nvml = self._nvml
        if nvml is None:
            return
        for name, handle in self._handles:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                metrics.gpu_utilization.labels(gpu=name).set(rates.gpu / 100.0)
            except Exception as exc:
                self._read_failed(name, "utilisation", exc)
                with contextlib.suppress(KeyError):
                    metrics.gpu_utilization.remove(name)
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                metrics.gpu_memory_used.labels(gpu=name).set(memory.used)
            except Exception as exc:
                self._read_failed(name, "memory", exc)
                with contextlib.suppress(KeyError):
                    metrics.gpu_memory_used.remove(name)

    def _read_failed(self, gpu: str, what: str, exc: Exception) -> None:
        key = (gpu, what)
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        logger.log(level, "NVML %s read failed for GPU %s: %s", what, gpu, exc)

    def close(self) -> None:
        """Shut NVML down. Safe to call twice."""
        nvml, self._nvml = self._nvml, None
        self._handles = []
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception as exc:
                logger.debug("NVML shutdown failed: %s", exc)
