"""The garbage collector in a worker process (worker/gc_tuning.py): thresholds, the frozen start-up heap,
a retired model's cycles freed all the same, and the collections' time exported."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from jetinfer.worker import gc_tuning
from jetinfer.worker.metrics import WorkerMetrics


@pytest.fixture(autouse=True)
def python_gc_restored() -> Iterator[None]:
    """Each test leaves pytest's process with the collector as it found it."""
    thresholds = gc.get_threshold()
    yield
    gc_tuning.collect_everything()
    gc.set_threshold(*thresholds)
    gc_tuning.clock.uninstall()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_tune_raises_the_youngest_threshold_and_zero_restores_pythons() -> None:
    gc_tuning.tune(20_000)
    assert gc.get_threshold() == (20_000, 10, 10)
    gc_tuning.tune(0)
    assert gc.get_threshold() == (700, 10, 10)


def test_a_frozen_cycle_survives_collect_but_not_collect_everything() -> None:
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    assert gc_tuning.freeze_startup_heap() > 0
    del cycle
    gc.collect()
    assert alive() is not None, "frozen: an ordinary collection leaves it (so the torch backend must not)"
    gc_tuning.collect_everything()
    assert alive() is None


def test_the_clock_counts_collections_by_generation_but_not_the_freeze() -> None:
    clock = gc_tuning.GcClock()
    clock.install()
    try:
        gc.collect(0)
        young, _, old = clock.seconds()
        assert young > 0
        assert old == 0
        with clock.paused():
            gc.collect()
        assert clock.seconds()[2] == 0
        gc.collect()
        assert clock.seconds()[2] > 0
    finally:
        clock.uninstall()


def test_a_workers_metrics_export_the_collections_once_the_clock_runs() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    assert b"jetinfer_gc_seconds_total{" not in generate_latest(registry)
    gc_tuning.clock.install()
    gc.collect()
    text = generate_latest(registry).decode()
    old = [line for line in text.splitlines() if line.startswith('jetinfer_gc_seconds_total{generation="2"}')]
    assert len(old) == 1
    assert float(old[0].split()[-1]) > 0
