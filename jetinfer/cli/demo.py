"""`jetinfer demo`: the whole path on one machine, with no setup (the CLI assembles worker and client).

Starts an embedded nats-server with JetStream, exports the demo classifier into a cache folder
(once), starts a worker, classifies sample photos through NATS with the producer client, prints
each photo's top-5 labels and a throughput line, and shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jetinfer.demo_models import DEMO_MODEL, default_model_cache, ensure_demo_model
from jetinfer.embedded import EmbeddedNatsServer
from jetinfer.labels import imagenet_labels, top_k
from jetinfer.producer.client import Client
from jetinfer.settings import require, setting
from jetinfer.worker.service import Worker
from jetinfer.worker.settings import WorkerSettings

__all__ = ["DemoSettings", "register", "run_demo", "sample_photos"]


@dataclass(kw_only=True)
class DemoSettings:
    """What `jetinfer demo` can be told."""

    cache_dir: Path = setting(default_model_cache(), "model repository for the demo models (exported once)")
    images: Path | None = setting(None, "folder of your own .jpg/.png photos to classify as well")
    requests: int = setting(256, "requests in the throughput run")
    concurrency: int = setting(32, "requests in flight during the throughput run")

    def __post_init__(self) -> None:
        require(self.requests >= 1, "requests", "must be at least 1")
        require(self.concurrency >= 1, "concurrency", "must be at least 1")
        require(self.images is None or self.images.is_dir(), "images", f"{self.images} is not a folder")


def sample_photos(extra: Path | None = None) -> list[tuple[str, bytes]]:
    """Real photographs as JPEG bytes: scikit-image's samples (the cat first), then `extra`'s files."""
    from PIL import Image

    photos: list[tuple[str, bytes]] = []
    try:
        import skimage.data

        for name in ("chelsea", "coffee", "astronaut", "rocket"):
            image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            photos.append((f"{name}.jpg", buffer.getvalue()))
    except ImportError:
        print(
            "scikit-image is not installed (pip install 'jetinfer[demo]'); using only --images",
            file=sys.stderr,
        )
    if extra is not None:
        for path in sorted(extra.iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
                photos.append((path.name, path.read_bytes()))
    return photos


async def run_demo(settings: DemoSettings) -> int:
    """Run the demo end to end; returns the exit status."""
    await asyncio.to_thread(ensure_demo_model, settings.cache_dir)
    photos = sample_photos(settings.images)
    if not photos:
        print("no photos to classify", file=sys.stderr)
        return 2
    labels = imagenet_labels()
    async with EmbeddedNatsServer() as server:
        print(f"nats-server with JetStream on {server.url}")
        worker_settings = WorkerSettings(
            nats_url=server.url,
            repository=settings.cache_dir,
            model=[DEMO_MODEL],
            metrics_port=0,
            reload_poll_s=0,
        )
        async with Worker(worker_settings) as worker, Client(server.url) as client:
            version = worker.slots[DEMO_MODEL].describe().get("version")
            print(f"worker serving {DEMO_MODEL} v{version} on ONNX Runtime (CPU)\n")
            for name, data in photos:
                reply = await client.infer(DEMO_MODEL, data, timeout=60)
                print(f"{name}  ({reply.timing['total_ms']:.1f} ms end to end)")
                for p in top_k(reply.output()[0], labels, 5):
                    print(f"    {p.score:6.3f}  {p.label}")
            latencies = await _throughput(client, photos[0][1], settings.requests, settings.concurrency)
    return 0 if latencies else 1


async def _throughput(client: Any, image: bytes, requests: int, concurrency: int) -> list[float]:
    from tqdm import tqdm

    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    # disable=None: a bar on a terminal only, never carriage returns in a log.
    progress = tqdm(total=requests, desc="throughput", unit="img", leave=False, file=sys.stderr, disable=None)

    async def one() -> None:
        async with semaphore:
            t0 = time.perf_counter()
            await client.infer(DEMO_MODEL, image, timeout=120)
            latencies.append(time.perf_counter() - t0)
            progress.update()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    elapsed = time.perf_counter() - started
    progress.close()
    print(
        f"\nthroughput: {requests} JPEG requests, {concurrency} in flight: "
        f"{requests / elapsed:.0f} images/s, "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000:.0f} ms"
    )
    return latencies


def register(subparsers: Any) -> None:
    """Add the `demo` subcommand."""
    from jetinfer.settings import add_arguments

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run the whole path locally: embedded NATS, a CPU classifier, sample photos",
        description="Start an embedded nats-server, export the demo classifier once, start a worker, "
        "classify sample photos through NATS, print top-5 labels and throughput, shut down.",
    )
    add_arguments(parser, DemoSettings)
    parser.set_defaults(handler=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    from jetinfer.settings import load_settings

    return asyncio.run(run_demo(load_settings(DemoSettings, args)))
