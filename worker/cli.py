"""`jetinfer serve`: run a worker until SIGTERM/SIGINT, then drain and exit 0 within the grace period.

A batch still running when the grace period ends has been given back to the stream by then (nak);
the process exits without waiting for its thread.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from jetinfer.settings import add_arguments, load_settings

from . import gc_tuning
from .backends.base import BackendFactory, load_backend
from .event_loop import event_loop_factory
from .service import Worker
from .settings import WorkerSettings

__all__ = ["register", "run_worker", "serve"]

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run a worker: pull requests from JetStream, run the model, reply",
        description="Serve models from a repository: pull micro-batches from the durable consumer "
        "worker-<model>, run them, reply, ack. SIGTERM drains gracefully.",
    )
    add_arguments(parser, WorkerSettings)
    parser.set_defaults(handler=_serve_command)


async def serve(
    settings: WorkerSettings,
    stop: asyncio.Event | None = None,
    *,
    backend_factory: BackendFactory = load_backend,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Run a worker until `stop` is set (or SIGTERM/SIGINT arrives); the exit status (1: it failed).

    `on_started` is called once the worker serves (its models loaded and warmed up).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Worker(settings, backend_factory=backend_factory) as worker:
            logger.info("worker %s %s", settings.worker_id, _start_line(worker))
            if on_started is not None:
                on_started()
            stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(worker.failed.wait())
            await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            failed.cancel()
            if worker.failed.is_set():
                logger.error("stopping: a model's pipeline failed (logged above)")
                return 1
            logger.info("stopping: finishing the batches in flight (grace %.0f s)", settings.grace_period_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def _start_line(worker: Worker) -> str:
    """What a started worker serves (with versions), what it waits for, and where its metrics are."""
    serving = [f"{m} v{worker.slots[m].describe().get('version')}" for m in worker.models if worker.serves(m)]
    waiting = [m for m in worker.models if not worker.serves(m)]
    said = f"serving {', '.join(serving)}" if serving else "serving nothing yet"
    if waiting:
        said += f"; waiting for a version of {', '.join(waiting)}"
    port = worker.health_port
    return said + (f"; metrics on port {port}" if port else "; metrics off (--metrics-port 0)")


def _busy_threads(wait_s: float = 0.2) -> list[threading.Thread]:
    """Threads other than this one that keep running (an inference that outlived the grace period)."""
    deadline = time.monotonic() + wait_s
    busy = []
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon or not thread.is_alive():
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            busy.append(thread)
    return busy


def _freeze_startup_heap() -> None:
    started = time.perf_counter()
    frozen = gc_tuning.freeze_startup_heap()
    logger.info(
        "garbage collection: every %d allocations; the %d objects made at start-up left out of its runs "
        "(collecting them took %.0f ms)",
        gc.get_threshold()[0],
        frozen,
        (time.perf_counter() - started) * 1000,
    )


def _serve_command(args: argparse.Namespace) -> int:
    return run_worker(load_settings(WorkerSettings, args))


def run_worker(settings: WorkerSettings, *, backend_factory: BackendFactory = load_backend) -> int:
    """The `jetinfer serve` process: run a worker until it is told to stop; its exit status."""
    if settings.gil_switch_ms:
        # Process-wide, so set here and not in Worker (which tests run inside pytest's process); a plan the
        # worker chooses itself sets it when a model on a GPU starts.
        sys.setswitchinterval(settings.gil_switch_ms / 1000.0)
    gc_tuning.clock.install()
    gc_tuning.tune(settings.gc_threshold)
    on_started = _freeze_startup_heap if settings.gc_threshold else None
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        status = runner.run(serve(settings, backend_factory=backend_factory, on_started=on_started))
    busy = _busy_threads()
    if busy:
        # The worker has stopped and given back what it held; Python would still wait for these threads
        # at exit (a batch longer than the grace period), past the grace period. Do not.
        logger.warning(
            "exiting without waiting for %s (still running after the grace period)",
            ", ".join(t.name for t in busy),
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
