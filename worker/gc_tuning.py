"""Python's garbage collector in a worker process: collected less often, the start-up heap left out, timed.

A worker makes a few dozen short-lived objects per message (the message, its headers, the request,
its arrays, the reply) and reference counting frees nearly all of them. Python's cyclic collector
still runs after every 700 net allocations of container objects, and with a full stream buffered
those runs find live messages and promote them, so the oldest generation — every object the process
holds, a loaded torch included — is walked again and again. `tune` raises the youngest generation's
threshold (the older ones keep Python's ratios to it) and `freeze_startup_heap` moves what exists
once the models are loaded into the permanent generation, which collections skip.

Frozen objects in reference cycles are never collected, and an exported torch module sits in such
cycles: `collect_everything` unfreezes first, so a model version that is retired leaves the GPU.
The process stays unfrozen after that (a reload is rare; the next start freezes again).

`GcClock` counts the seconds collections take, by generation (`jetinfer_gc_seconds_total`): a
collection stops every thread that needs the GIL, so this is time no request moves.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "DEFAULT_GEN0_THRESHOLD",
    "GcClock",
    "clock",
    "collect_everything",
    "freeze_startup_heap",
    "tune",
]

#: Allocations between collections of the youngest generation (Python's default is 700).
DEFAULT_GEN0_THRESHOLD: Final = 20_000
_PYTHON_THRESHOLDS: Final = (700, 10, 10)

_lock = threading.Lock()
_frozen = False


def tune(gen0_threshold: int) -> None:
    """Collect the youngest generation every `gen0_threshold` allocations (0: Python's defaults)."""
    if gen0_threshold == 0:
        gc.set_threshold(*_PYTHON_THRESHOLDS)
    else:
        gc.set_threshold(gen0_threshold, *_PYTHON_THRESHOLDS[1:])


def freeze_startup_heap() -> int:
    """Collect once, then leave every object alive now out of later collections; how many there are."""
    global _frozen
    with _lock, clock.paused():
        gc.collect()
        gc.freeze()
        _frozen = True
        return gc.get_freeze_count()


def collect_everything() -> None:
    """A full collection that frees the start-up heap's cycles too (unfreezing it for good)."""
    global _frozen
    with _lock:
        if _frozen:
            gc.unfreeze()
            _frozen = False
    gc.collect()


class GcClock(Collector):
    """Seconds spent in collections, by generation, once `install`ed; a Prometheus collector of them."""

    def __init__(self) -> None:
        self._seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        self._installed = False
        self._paused = 0

    def install(self) -> None:
        """Start timing this process's collections (once; later calls do nothing)."""
        if not self._installed:
            self._installed = True
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        """Stop timing (tests)."""
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif not self._paused and self._started:
            self._seconds[min(int(info["generation"]), 2)] += time.perf_counter() - self._started

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A `with` block whose collections are not counted (the one at start-up)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def seconds(self) -> tuple[float, float, float]:
        """Seconds in collections of generations 0, 1 and 2 so far."""
        young, middle, old = self._seconds
        return young, middle, old

    def collect(self) -> Iterator[CounterMetricFamily]:
        """`jetinfer_gc_seconds_total{generation}` (no series until installed)."""
        family = CounterMetricFamily(
            "jetinfer_gc_seconds",
            "Time Python's garbage collector ran (every thread that needs the GIL waits), by generation",
            labels=["generation"],
        )
        if self._installed:
            for generation, seconds in enumerate(self._seconds):
                family.add_metric([str(generation)], seconds)
        yield family


#: The process's clock: `jetinfer serve` installs it, every worker's registry exports it.
clock: Final = GcClock()
