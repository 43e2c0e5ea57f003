"""Prometheus metrics of a worker, in one class that takes the registry (so tests get their own).

Names follow `jetinfer_<noun>_{total|seconds|bytes}`; labels are drawn from the fixed set
(`model`, `version`, `status`), plus `gpu` for device gauges.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["GpuProbe", "WorkerMetrics"]

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class WorkerMetrics:
    """Every metric a worker exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
        self.gpu_utilization = Gauge(
            "jetinfer_gpu_utilization_ratio", "GPU utilisation (0..1) from NVML", ["gpu"], registry=registry
        )
        self.gpu_memory_used = Gauge(
            "jetinfer_gpu_memory_used_bytes", "GPU memory in use from NVML", ["gpu"], registry=registry
        )


class GpuProbe:
    """Reads GPU utilisation and memory through NVML where a GPU and nvidia-ml-py are present."""

    def __init__(self) -> None:
        self._handles: list[tuple[str, Any]] = []
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            for index in range(pynvml.nvmlDeviceGetCount()):
                self._handles.append((str(index), pynvml.nvmlDeviceGetHandleByIndex(index)))
        except Exception as exc:  # no NVML, no driver, no GPU: the gauges stay absent
            logger.debug("NVML unavailable: %s", exc)
            self._handles = []

    @property
    def available(self) -> bool:
        """Whether any GPU was found."""
        return bool(self._handles)

    def update(self, metrics: WorkerMetrics) -> None:
        """Set the GPU gauges (blocking NVML calls: run in a thread)."""
        for name, handle in self._handles:
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:
                logger.warning("NVML read failed for GPU %s: %s", name, exc)
                continue
            metrics.gpu_utilization.labels(gpu=name).set(rates.gpu / 100.0)
            metrics.gpu_memory_used.labels(gpu=name).set(memory.used)
