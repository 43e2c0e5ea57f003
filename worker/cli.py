"""`jetinfer serve`: run a worker until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from jetinfer.settings import add_arguments, load_settings
from worker.service import Worker
from worker.settings import WorkerSettings

__all__ = ["register", "serve"]

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


async def serve(settings: WorkerSettings, stop: asyncio.Event | None = None) -> None:
    """Run a worker until `stop` is set (or SIGTERM/SIGINT arrives)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Worker(settings) as worker:
            logger.info(
                "worker %s serving %s; metrics on port %s",
                settings.worker_id,
                ", ".join(worker.models),
                worker.health_port,
            )
            await stop.wait()
            logger.info("stopping: finishing the batches in flight (grace %.0f s)", settings.grace_period_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _serve_command(args: argparse.Namespace) -> int:
    settings = load_settings(WorkerSettings, args)
    asyncio.run(serve(settings))
    return 0
