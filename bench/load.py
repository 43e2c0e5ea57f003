"""`jetinfer bench`: a load generator, with the engine-only and bare-loop baselines in the same run.

Closed loop (`--concurrency`, several values sweep) or open loop (`--rate`), JPEG or tensor
payloads with several frames per message. Reports throughput, p50/p90/p99/max latency, the batch
sizes the worker formed (scraped from its /metrics) and errors by code. With `--embedded` it starts
a nats-server and the worker (or the bare nats-py loop, `--bare`) as subprocesses; `--engine-only`
times the same model called directly, so the ratios come from one run on one machine.

A run fails fast when its first request does (a model nobody serves, a payload it refuses; exit 2),
and exits 1, after the table, naming each load level where every request failed or more than
`--max-error-ratio` did. The embedded nats-server, workers and engine-bench run in process groups of
their own that die with the bench, even on `kill -9` (`jetinfer.children`), and take the server's
temporary store with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jetinfer.children import forget, spawn
from jetinfer.demo_models import DEMO_MODEL, default_model_cache, ensure_demo_model
from jetinfer.embedded import EmbeddedNatsServer, free_port
from jetinfer.errors import SettingsError
from jetinfer.producer.client import Client, Payload
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelRepository
from jetinfer.settings import ConnectionSettings, add_arguments, load_settings

from .settings import BenchSettings, parse_cpus

__all__ = [
    "BenchPoint",
    "LatencySummary",
    "closed_loop",
    "open_loop",
    "register",
    "require_model",
    "run_failures",
    "scrape_worker_metrics",
    "summarize",
]


@dataclass(frozen=True)
class LatencySummary:
    """Throughput and latency percentiles of one load level."""

    requests: int
    frames: int
    elapsed_s: float
    requests_per_s: float
    frames_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int] = field(default_factory=dict)


def summarize(
    latencies_s: Sequence[float],
    elapsed_s: float,
    *,
    frames_per_request: int = 1,
    errors: Counter[str] | None = None,
) -> LatencySummary:
    """Percentiles (nearest-rank) and rates of the successful requests' latencies."""
    ordered = sorted(latencies_s)
    count = len(ordered)

    def rank(q: float) -> float:
        if not ordered:
            return math.nan
        return ordered[max(0, math.ceil(q * count) - 1)] * 1000

    return LatencySummary(
        requests=count,
        frames=count * frames_per_request,
        elapsed_s=elapsed_s,
        requests_per_s=count / elapsed_s if elapsed_s > 0 else 0.0,
        frames_per_s=count * frames_per_request / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=rank(0.50),
        p90_ms=rank(0.90),
        p99_ms=rank(0.99),
        max_ms=ordered[-1] * 1000 if ordered else math.nan,
        mean_ms=sum(ordered) / count * 1000 if ordered else math.nan,
        errors=dict(errors or {}),
    )


@dataclass
class BenchPoint:
    """One load level's result, with what the worker reported for it."""

    mode: str
    load: float
    summary: LatencySummary
    mean_batch: float | None = None
    batches: int | None = None
    gpu_memory_before_bytes: float | None = None
    gpu_memory_after_bytes: float | None = None
    #: Medians of the replies' worker timings (queue_ms, infer_ms, total_ms); one load process only.
    worker_timing_p50_ms: dict[str, float] = field(default_factory=dict)
    #: Per pipeline stage, the share of its time each activity took (jetinfer_stage_seconds_total).
    stage_shares: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Garbage collection in the workers per request answered, milliseconds (jetinfer_gc_seconds_total).
    gc_ms_per_request: float | None = None
    round: int = 1


@dataclass
class _Tally:
    """What one load level collects: latencies of the answered requests and failures by code."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    #: Where given, each reply's worker timings (queue_ms, infer_ms, total_ms) by name.
    timings: dict[str, list[float]] | None = None

    async def request(
        self,
        client: Client,
        model: str,
        payload: Payload,
        *,
        since: float,
        timeout_s: float,
        input_name: str,
        progress: Any,
    ) -> None:
        """Send one request; record its latency from `since`, or its failure, whatever it is."""
        try:
            reply = await client.infer(model, payload, timeout=timeout_s, input_name=input_name)
        except Exception as exc:  # a load generator counts failures, it never stops on one
            self.errors[getattr(exc, "code", None) or type(exc).__name__] += 1
            return
        self.latencies.append(time.perf_counter() - since)
        if self.timings is not None:
            for name, value in reply.timing.items():
                self.timings.setdefault(name, []).append(value)
        if progress is not None:
            progress.update()


async def closed_loop(
    client: Client,
    model: str,
    payload: Payload,
    *,
    concurrency: int,
    duration_s: float,
    timeout_s: float = 30.0,
    progress: Any = None,
    input_name: str = "input",
    timings: dict[str, list[float]] | None = None,
) -> tuple[list[float], Counter[str], float]:
    """`concurrency` users each sending a request as soon as the previous one is answered.

    `timings`, where given, collects the worker's timings of each reply by name.
    """
    tally = _Tally(timings=timings)
    deadline = time.perf_counter() + duration_s

    async def user() -> None:
        while time.perf_counter() < deadline:
            await tally.request(
                client,
                model,
                payload,
                since=time.perf_counter(),
                timeout_s=timeout_s,
                input_name=input_name,
                progress=progress,
            )

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return tally.latencies, tally.errors, time.perf_counter() - started


async def open_loop(
    client: Client,
    model: str,
    payload: Payload,
    *,
    rate: float,
    duration_s: float,
    timeout_s: float = 30.0,
    progress: Any = None,
    input_name: str = "input",
    timings: dict[str, list[float]] | None = None,
) -> tuple[list[float], Counter[str], float]:
    """Requests sent at `rate` per second regardless of replies; latency counts from the scheduled time.

    `timings`, where given, collects the worker's timings of each reply by name.
    """
    tally = _Tally(timings=timings)
    total = max(1, int(rate * duration_s))
    started = time.perf_counter()

    async def one(scheduled: float) -> None:
        await tally.request(
            client,
            model,
            payload,
            since=scheduled,
            timeout_s=timeout_s,
            input_name=input_name,
            progress=progress,
        )

    tasks = []
    for index in range(total):
        scheduled = started + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    return tally.latencies, tally.errors, time.perf_counter() - started


def _client_process(
    connection: ConnectionSettings,
    model: str,
    payload: Payload,
    concurrency: int,
    rate: float | None,
    duration_s: float,
    input_name: str,
    timeout_s: float,
) -> tuple[list[float], dict[str, int], float]:
    """One load-generating process of `--clients N` (runs its own event loop and connection)."""

    async def main() -> tuple[list[float], Counter[str], float]:
        async with Client(settings=connection) as client:
            if rate:
                return await open_loop(
                    client,
                    model,
                    payload,
                    rate=rate,
                    duration_s=duration_s,
                    input_name=input_name,
                    timeout_s=timeout_s,
                )
            return await closed_loop(
                client,
                model,
                payload,
                concurrency=concurrency,
                duration_s=duration_s,
                input_name=input_name,
                timeout_s=timeout_s,
            )

    latencies, errors, elapsed = asyncio.run(main())
    return latencies, dict(errors), elapsed


async def _multi_process_level(
    settings: BenchSettings, connection: ConnectionSettings, payload: Payload, level: float
) -> tuple[list[float], Counter[str], float]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    clients = settings.clients
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=clients, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            loop.run_in_executor(
                pool,
                _client_process,
                connection,
                settings.model,
                payload,
                max(1, int(level) // clients),
                level / clients if settings.rate else None,
                settings.duration_s,
                settings.input_name,
                settings.timeout_s,
            )
            for _ in range(clients)
        ]
        results = await asyncio.gather(*futures)
    latencies = [x for lat, _, _ in results for x in lat]
    errors: Counter[str] = Counter()
    for _, errs, _ in results:
        errors.update(errs)
    return latencies, errors, max(elapsed for _, _, elapsed in results)


def scrape_worker_metrics(url: str) -> dict[str, float]:
    """Batch count and frame sum, and requests, from a worker's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {"batches": 0.0, "frames": 0.0, "requests": 0.0, "gpu_memory_bytes": 0.0, "gc_seconds": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "jetinfer_batch_size_count":
                out["batches"] += sample.value
            elif sample.name == "jetinfer_batch_size_sum":
                out["frames"] += sample.value
            elif sample.name == "jetinfer_requests_total":
                out["requests"] += sample.value
            elif sample.name == "jetinfer_gpu_memory_used_bytes":
                out["gpu_memory_bytes"] += sample.value
            elif sample.name == "jetinfer_gc_seconds_total":
                out["gc_seconds"] += sample.value
            elif sample.name == "jetinfer_stage_seconds_total":
                key = f"stage:{sample.labels['stage']}:{sample.labels['activity']}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def stage_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per stage, each activity's share of the stage's time between two scrapes (`scrape_worker_metrics`)."""
    spent: dict[str, dict[str, float]] = {}
    for key, value in after.items():
        if key.startswith("stage:"):
            _, stage, activity = key.split(":")
            spent.setdefault(stage, {})[activity] = max(0.0, value - before.get(key, 0.0))
    return {
        stage: {activity: seconds / total for activity, seconds in activities.items()}
        for stage, activities in spent.items()
        if (total := sum(activities.values())) > 0
    }


def _cat_jpeg(size: int | None) -> bytes:
    from PIL import Image

    try:
        import skimage.data

        image = Image.fromarray(skimage.data.chelsea())  # type: ignore[no-untyped-call]
    except ImportError:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (300, 450, 3), dtype=np.uint8))
    if size:
        image = image.resize((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_payload(settings: BenchSettings, repository: Path | None) -> tuple[Payload, int]:
    """(payload, frames per request) for the chosen kind."""
    if settings.payload == "jpeg":
        image = settings.image.read_bytes() if settings.image else _cat_jpeg(settings.image_size)
        if settings.frames > 1:  # several JPEGs in one message: a BYTES input, a frame each
            return [image] * settings.frames, settings.frames
        return image, 1
    shape: list[int] | None = None
    datatype = "FP32"
    if settings.shape:
        shape = [int(s) for s in settings.shape.split(",")]
    elif repository is not None:
        spec = ModelRepository(repository).config(settings.model).inputs[0]
        shape = [d if d > 0 else 256 for d in spec.shape]
        datatype = spec.datatype
    if shape is None:
        raise SettingsError(
            "shape", "give --shape (per frame) or --repository to read the model's input shape"
        )
    rng = np.random.default_rng(0)
    array: npt.NDArray[Any] = rng.standard_normal((settings.frames, *shape)).astype(DATATYPES[datatype])
    return array, settings.frames


def _engine_only(repository: Path, model: str, batches: list[int], duration_s: float) -> list[dict[str, Any]]:
    """Engine-only rows one batch at a time and, for onnxruntime (which can), two at once: the ratios
    divide by the engine's best configuration, whichever the worker runs (`--parallel-batches`)."""
    rows = _engine_bench_rows(repository, model, batches, duration_s, parallel_batches=1)
    if any(row.get("backend") == "onnxruntime" for row in rows):
        rows += _engine_bench_rows(repository, model, batches, duration_s, parallel_batches=2)
    return rows


def _engine_bench_rows(
    repository: Path, model: str, batches: list[int], duration_s: float, *, parallel_batches: int
) -> list[dict[str, Any]]:
    command = [
        sys.executable,
        "-m",
        "jetinfer.cli",
        "--log-level",
        "WARNING",
        "engine-bench",
        "--repository",
        str(repository),
        "--model",
        model,
        "--duration-s",
        str(duration_s),
        "--parallel-batches",
        str(parallel_batches),
        "--json",
    ]
    for batch in batches:
        command += ["--batch", str(batch)]
    process = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # dies with the bench
    try:
        stdout, stderr = process.communicate()
    finally:
        forget(process)
    if process.returncode != 0:
        raise RuntimeError(f"engine-bench failed: {stderr.decode(errors='replace')[-2000:]}")
    parsed: list[dict[str, Any]] = json.loads(stdout.decode().strip().splitlines()[-1])
    return parsed


def require_model(repository: Path, model: str) -> None:
    """Refuse a run for a model the repository cannot serve (SettingsError naming --model)."""
    repo = ModelRepository(repository)
    models = repo.models()
    if model not in models:
        where = (
            f"{repository} has no model {model!r}" if repository.is_dir() else f"{repository} does not exist"
        )
        have = f" (it has {', '.join(models)})" if models else ""
        raise SettingsError("model", f"{where}{have}; give --model one of its models, or --repository")
    if not repo.candidates(model):
        raise SettingsError("model", f"{repository / model} has no version to serve yet")


def run_failures(points: Sequence[BenchPoint], max_error_ratio: float) -> list[str]:
    """Why a run failed: each load level where every request failed, or more than `max_error_ratio` did."""
    reasons = []
    for point in points:
        failed = sum(point.summary.errors.values())
        total = failed + point.summary.requests
        what = f"{point.mode} {point.load:g} (round {point.round})"
        if total and failed == total:
            reasons.append(f"{what}: every request failed: {point.summary.errors}")
        elif total and failed / total > max_error_ratio:
            reasons.append(
                f"{what}: {failed} of {total} requests failed ({failed / total:.1%}, above "
                f"--max-error-ratio {max_error_ratio:g}): {point.summary.errors}"
            )
    return reasons


def _wait_http_ok(url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with {process.returncode} before it was ready")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")


@contextlib.asynccontextmanager
async def embedded_stack(
    repository: Path,
    model: str,
    *,
    bare: bool,
    worker_args: Sequence[str],
    workers: int = 1,
    devices: Sequence[int] = (),
    worker_cpus: set[int] | None = None,
    worker_log_level: str = "WARNING",
    before_workers: Callable[[str], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[str, list[str]]]:
    """A nats-server and `workers` worker (or bare loop) subprocesses; yields (nats url, metrics urls).

    `before_workers`, where given, is awaited with the server's URL before any worker starts.

    With `devices`, worker i runs on GPU `devices[i % len(devices)]` (one worker per GPU: `--devices 0,1`).
    With `worker_cpus`, the workers run on those CPUs alone (as a pod's CPU limit would have them), and
    this process, nats-server and the load generators on the others.
    """
    if worker_cpus:
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) - worker_cpus)  # children inherit it
    async with EmbeddedNatsServer() as server:
        if before_workers is not None:
            await before_workers(server.url)
        processes: list[subprocess.Popen[bytes]] = []
        metrics_urls: list[str] = []
        try:
            for index in range(workers):
                metrics_port = free_port()
                device_args = ["--device", str(devices[index % len(devices)])] if devices else []
                if bare:
                    command = [
                        sys.executable,
                        "-m",
                        "jetinfer.bench.bare_loop",
                        "--nats-url",
                        server.url,
                        "--model",
                        model,
                    ]
                else:
                    command = [
                        sys.executable,
                        "-m",
                        "jetinfer.cli",
                        "--log-level",
                        worker_log_level,
                        "serve",
                        "--nats-url",
                        server.url,
                        "--repository",
                        str(repository),
                        "--model",
                        model,
                        "--metrics-port",
                        str(metrics_port),
                        "--metrics-host",
                        "127.0.0.1",
                        "--reload-poll-s",
                        "0",
                        *device_args,
                        *worker_args,
                    ]
                # In a group of its own that dies with the bench, even on kill -9 (jetinfer.children).
                pin = {"preexec_fn": lambda: os.sched_setaffinity(0, worker_cpus)} if worker_cpus else {}
                process = await asyncio.to_thread(spawn, command, stdout=subprocess.PIPE, stderr=None, **pin)
                processes.append(process)
                if bare:
                    assert process.stdout is not None
                    line = await asyncio.to_thread(process.stdout.readline)
                    if b"ready" not in line:
                        raise RuntimeError("the bare loop did not start")
                else:
                    url = f"http://127.0.0.1:{metrics_port}"
                    await asyncio.to_thread(_wait_http_ok, f"{url}/readyz", 180, process)
                    metrics_urls.append(f"{url}/metrics")
            yield server.url, metrics_urls
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await asyncio.to_thread(process.wait)
                forget(process)
                if process.stdout is not None:
                    process.stdout.close()


def _stack(
    settings: BenchSettings,
    repository: Path,
    *,
    bare: bool,
    before_workers: Callable[[str], Awaitable[None]] | None = None,
) -> contextlib.AbstractAsyncContextManager[tuple[str, list[str]]]:
    """`embedded_stack` as the settings ask for it (model, workers, devices, CPUs, log level)."""
    return embedded_stack(
        repository,
        settings.model,
        bare=bare,
        worker_args=settings.worker_arg or [],
        workers=settings.workers,
        devices=[int(d) for d in settings.devices.split(",")] if settings.devices else [],
        worker_cpus=parse_cpus(settings.worker_cpus) if settings.worker_cpus else None,
        worker_log_level=settings.worker_log_level,
        before_workers=before_workers,
    )


def _scrape_all(urls: Sequence[str]) -> dict[str, float]:
    """Counters summed over the workers; GPU memory the largest one reports (each reads the same GPUs
    through NVML, so a sum would count a shared GPU once per worker)."""
    total: dict[str, float] = {}
    for url in urls:
        for key, value in scrape_worker_metrics(url).items():
            if key == "gpu_memory_bytes":
                total[key] = max(total.get(key, 0.0), value)
            else:
                total[key] = total.get(key, 0.0) + value
    return total


async def _run_levels(
    settings: BenchSettings,
    connection: ConnectionSettings,
    metrics_urls: Sequence[str],
    payload: Payload,
    frames: int,
    mode: str,
) -> list[BenchPoint]:
    from tqdm import tqdm

    points = []
    levels = settings.levels
    async with Client(settings=connection) as client:
        # One request first, on its own: a model nobody serves, or a payload it refuses, fails the run
        # here, at once, with the error's own line (instead of a whole run of failures).
        await client.infer(
            settings.model, payload, timeout=settings.timeout_s, input_name=settings.input_name
        )
        # Warm up: the first requests pay for connections, caches and the engine's first batches.
        await closed_loop(
            client,
            settings.model,
            payload,
            concurrency=max(1, min(settings.concurrency)),  # open-loop levels are rates, not users
            duration_s=settings.warmup_s,
            input_name=settings.input_name,
            timeout_s=settings.timeout_s,
        )
        for level in levels:
            before = _scrape_all(metrics_urls) if metrics_urls else None
            progress = tqdm(
                desc=f"{mode} {'rate' if settings.rate else 'concurrency'} {level:g}",
                unit="req",
                leave=False,
                file=sys.stderr,
                disable=None if settings.progress else True,
            )
            timings: dict[str, list[float]] = {}
            if settings.clients > 1:
                lat, errors, elapsed = await _multi_process_level(settings, connection, payload, level)
            elif settings.rate:
                lat, errors, elapsed = await open_loop(
                    client,
                    settings.model,
                    payload,
                    rate=level,
                    duration_s=settings.duration_s,
                    progress=progress,
                    input_name=settings.input_name,
                    timings=timings,
                    timeout_s=settings.timeout_s,
                )
            else:
                lat, errors, elapsed = await closed_loop(
                    client,
                    settings.model,
                    payload,
                    concurrency=int(level),
                    duration_s=settings.duration_s,
                    progress=progress,
                    input_name=settings.input_name,
                    timings=timings,
                    timeout_s=settings.timeout_s,
                )
            progress.close()
            point = BenchPoint(
                mode, float(level), summarize(lat, elapsed, frames_per_request=frames, errors=errors)
            )
            point.worker_timing_p50_ms = {
                name: round(statistics.median(values), 3) for name, values in timings.items() if values
            }
            if metrics_urls and before is not None:
                _add_worker_figures(point, before, _scrape_all(metrics_urls))
            points.append(point)
    return points


async def _drain_backlog(
    settings: BenchSettings, repository: Path, payload: Payload, frames: int, *, bare: bool = False
) -> BenchPoint:
    """`--backlog N`: N requests stored, then the workers (or, with `bare`, as many bare loops) started
    and timed answering them."""
    from .drain import Backlog

    backlog = Backlog(settings.model, payload, count=settings.backlog, input_name=settings.input_name)
    try:
        async with _stack(settings, repository, bare=bare, before_workers=backlog.publish) as (
            _,
            metrics_urls,
        ):
            before = _scrape_all(metrics_urls)
            await backlog.wait(settings.timeout_s)
            after = _scrape_all(metrics_urls)
            await backlog.close()  # before the server stops
    finally:
        await backlog.close()
    (rate, span), nan = backlog.drain_rate(), math.nan
    answered = len(backlog.arrivals)
    summary = LatencySummary(  # latencies are not what a backlog measures
        requests=answered,
        frames=answered * frames,
        elapsed_s=span,
        requests_per_s=rate,
        frames_per_s=rate * frames,
        p50_ms=nan,
        p90_ms=nan,
        p99_ms=nan,
        max_ms=nan,
        mean_ms=nan,
        errors=dict(backlog.errors),
    )
    point = BenchPoint("bare-backlog" if bare else "backlog", float(settings.backlog), summary)
    # The workers started with the backlog: their counters since start are the whole drain (some of
    # it may be done before they are ready); the GPU memory is as they were ready, and the garbage
    # collector counts from then (its start-up runs are not the drain's). Bare loops have no metrics.
    if after:
        at_ready = {key: before[key] for key in ("gpu_memory_bytes", "gc_seconds")}
        _add_worker_figures(point, at_ready, after)
    return point


def _add_worker_figures(point: BenchPoint, before: dict[str, float], after: dict[str, float]) -> None:
    """The batches, mean batch, stage shares, garbage collection and GPU memory of `point`, from two
    scrapes of the workers' metrics (`scrape_worker_metrics`; a counter missing from `before` counts
    from 0)."""
    point.stage_shares = stage_shares(before, after)
    if point.summary.requests:
        gc_s = after.get("gc_seconds", 0.0) - before.get("gc_seconds", 0.0)
        point.gc_ms_per_request = gc_s * 1000 / point.summary.requests
    point.batches = int(after["batches"] - before.get("batches", 0.0))
    if after["gpu_memory_bytes"]:
        point.gpu_memory_before_bytes = before["gpu_memory_bytes"]
        point.gpu_memory_after_bytes = after["gpu_memory_bytes"]
    if point.batches:
        point.mean_batch = (after["frames"] - before.get("frames", 0.0)) / point.batches


def round_ratios(points: list[BenchPoint], engine: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per round, best worker frames/s over best bare loop (and over best engine-only, where measured).

    Rounds alternate the worker and its baselines, so a slow spell of a shared machine lands in one
    round's ratio instead of between a baseline and the worker measured minutes apart.
    """
    ratios: dict[str, list[float]] = {}
    for number in sorted({p.round for p in points}):

        def best(mode: str, number: int = number) -> float:
            return max(
                (p.summary.frames_per_s for p in points if p.mode == mode and p.round == number), default=0
            )

        worker, bare = best("worker"), best("bare")
        engine_best = max(
            (row["frames_per_s"] for row in engine if row.get("round", 1) == number), default=0.0
        )
        if worker and bare:
            ratios.setdefault("worker/bare loop", []).append(worker / bare)
        if worker and engine_best:
            ratios.setdefault("worker/engine-only", []).append(worker / engine_best)
    return ratios


def _table(points: list[BenchPoint], engine: list[dict[str, Any]]) -> str:
    rounds = len({p.round for p in points}) > 1
    lines = [
        ("round " if rounds else "")
        + f"{'mode':<8} {'load':>7} {'req/s':>9} {'frames/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'batch':>6} errors"
    ]
    for p in points:
        s = p.summary
        batch = f"{p.mean_batch:.1f}" if p.mean_batch else "-"
        lines.append(
            (f"{p.round:>5} " if rounds else "")
            + f"{p.mode:<8} {p.load:>7g} {s.requests_per_s:>9.1f} {s.frames_per_s:>9.1f} {s.p50_ms:>8.2f} "
            f"{s.p90_ms:>8.2f} {s.p99_ms:>8.2f} {s.max_ms:>8.2f} {batch:>6} {s.errors or '-'}"
        )
    for p in points:
        for stage, shares in p.stage_shares.items():
            top = sorted(shares.items(), key=lambda item: -item[1])
            listed = ", ".join(f"{activity} {share:.2f}" for activity, share in top if share >= 0.01)
            lines.append(f"  {p.mode} {p.load:g}, {stage} stage: {listed}")
        if p.gc_ms_per_request is not None:
            share = p.gc_ms_per_request * p.summary.requests_per_s / 1000
            lines.append(
                f"  {p.mode} {p.load:g}, garbage collection: {p.gc_ms_per_request * 1000:.1f} µs per request"
                f" ({share:.1%} of the time)"
            )
    for row in engine:
        at_once = row.get("batches_at_once", 1)
        load = f"{row['batch']}" if at_once == 1 else f"{row['batch']}x{at_once}"
        lines.append(
            (f"{row.get('round', 1):>5} " if rounds else "")
            + f"{'engine':<8} {load:>7} {'':>9} {row['frames_per_s']:>9.1f} {row['latency_ms_p50']:>8.2f}"
        )
    best_engine = max((row["frames_per_s"] for row in engine), default=0.0)
    best = {
        mode: max(p.summary.frames_per_s for p in points if p.mode == mode)
        for mode in {p.mode for p in points}
    }
    if best_engine:
        for mode, value in sorted(best.items()):
            lines.append(f"ratio {mode}/engine-only (best frames/s): {value / best_engine:.3f}")
    if "worker" in best and "bare" in best and best["bare"]:
        lines.append(f"ratio worker/bare loop (best frames/s): {best['worker'] / best['bare']:.3f}")
    if rounds:
        for name, values in round_ratios(points, engine).items():
            listed = ", ".join(f"{v:.3f}" for v in values)
            lines.append(f"ratio {name} per round: {listed}; median {statistics.median(values):.3f}")
    return "\n".join(lines)


def _plot(points: list[BenchPoint], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SettingsError("plot", "needs matplotlib: pip install 'jetinfer[bench]'") from None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mode in sorted({p.mode for p in points}):
        mine = [p for p in points if p.mode == mode]
        for quantile, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            axis.plot(
                [p.summary.frames_per_s for p in mine],
                [getattr(p.summary, quantile) for p in mine],
                style,
                label=f"{mode} {quantile[:3]}",
            )
    axis.set_xlabel("throughput (frames/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend()
    axis.set_title("jetinfer bench: latency against throughput")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


async def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run every requested measurement; returns the report."""
    repository: Path | None = settings.repository
    if settings.embedded and repository is None:
        repository = default_model_cache()
        if settings.model == DEMO_MODEL:
            await asyncio.to_thread(ensure_demo_model, repository)
    if repository is not None and (settings.embedded or settings.engine_only):
        require_model(repository, settings.model)
    payload, frames = make_payload(settings, repository)
    points: list[BenchPoint] = []
    engine: list[dict[str, Any]] = []
    if settings.engine_only and repository is None:
        raise SettingsError("repository", "--engine-only needs --repository (or --embedded)")
    for number in range(1, settings.rounds + 1):
        if settings.embedded:
            assert repository is not None
            modes = ["worker", "bare"] if settings.bare else ["worker"]
            if settings.backlog:
                for bare in (False, True) if settings.bare else (False,):
                    point = await _drain_backlog(settings, repository, payload, frames, bare=bare)
                    points.append(dataclasses.replace(point, round=number))
                modes = []
            for mode in modes:
                async with _stack(settings, repository, bare=mode == "bare") as (url, metrics_urls):
                    embedded = ConnectionSettings(nats_url=url)
                    measured = await _run_levels(settings, embedded, metrics_urls, payload, frames, mode)
                    points += [dataclasses.replace(p, round=number) for p in measured]
        else:
            urls = [settings.metrics_url] if settings.metrics_url else []
            measured = await _run_levels(settings, settings, urls, payload, frames, "worker")
            points += [dataclasses.replace(p, round=number) for p in measured]
        if settings.engine_only:
            assert repository is not None
            config = ModelRepository(repository).config(settings.model)
            batches = settings.engine_batch or sorted({1, config.max_batch})
            rows = await asyncio.to_thread(
                _engine_only, repository, settings.model, batches, settings.duration_s
            )
            engine += [{**row, "round": number} for row in rows]
    report = {
        "model": settings.model,
        "payload": settings.payload,
        "frames_per_request": frames,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "points": [{**asdict(p), "summary": asdict(p.summary)} for p in points],
        "engine_only": engine,
        "table": _table(points, engine),
        "failures": run_failures(points, settings.max_error_ratio),
    }
    if settings.plot:
        _plot(points, settings.plot)
    return report


def register(subparsers: Any) -> None:
    """Add the `bench` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="load-test a worker (closed or open loop) and compare with engine-only and bare-loop baselines",
        description="Measure end-to-end throughput and latency through NATS. With --embedded, starts a "
        "nats-server and a worker (and with --bare the bare nats-py loop) as subprocesses.",
    )
    add_arguments(parser, BenchSettings)
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    settings = load_settings(BenchSettings, args)
    report = asyncio.run(run_bench(settings))
    if settings.json is not None:
        text = json.dumps(report, indent=2, default=str)
        if str(settings.json) == "-":
            print(text)
        else:
            settings.json.write_text(text)
    print(report["table"])
    failures = report["failures"]
    for reason in failures:
        print(f"jetinfer bench: failed: {reason}", file=sys.stderr)
    return 1 if failures else 0
