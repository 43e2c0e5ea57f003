"""Metrics, proven against real parts (issue 6): a worker's /metrics scraped under load with
prometheus-client's own parser, its lag gauge compared with what KEDA's nats-jetstream scaler reads
from nats-server's monitoring port, the GPU gauges, and the client's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from jetinfer.embedded import EmbeddedNatsServer, free_port
from jetinfer.errors import InvalidInputError, RequestTimeoutError, TooLargeError, UnknownModelError
from jetinfer.producer.client import Client
from jetinfer.producer.metrics import ClientMetrics
from jetinfer.protocol import HEADER_STATUS
from jetinfer.settings import ConnectionSettings, StreamSettings
from jetinfer.streams import (
    INFER_STREAM,
    consumer_name,
    ensure_consumer,
    ensure_streams,
    register_model,
    reload_subject,
)
from jetinfer.worker import gc_tuning
from jetinfer.worker.metrics import GpuProbe, WorkerMetrics
from jetinfer.worker.stage_clock import ACTIVITIES
from tests.conftest import NatsUnderTest, running_worker, wait_until_answered

FRAME = 16  # values per frame of the identity model (its per-frame shape is [-1])

# The agreed label set of every worker series (DESIGN.md "Metrics and health"), histogram `le` aside.
WORKER_LABELS = {
    "jetinfer_requests_total": {"model", "version", "status"},
    "jetinfer_request_duration_seconds": {"model", "version", "status"},
    "jetinfer_reloads_total": {"model", "version", "status"},
    "jetinfer_batch_size": {"model", "version"},
    "jetinfer_inference_seconds": {"model", "version"},
    "jetinfer_queue_wait_seconds": {"model"},
    "jetinfer_inflight_requests": {"model"},
    "jetinfer_consumer_lag": {"model"},
    "jetinfer_oldest_request_age_seconds": {"model"},
    "jetinfer_gpu_utilization_ratio": {"gpu"},
    "jetinfer_gpu_memory_used_bytes": {"gpu"},
    # Where the stages spend their time (worker/stage_clock.py): two labels beyond DESIGN.md's set.
    "jetinfer_stage_seconds_total": {"model", "stage", "activity"},
    # Python's garbage collector, process-wide (worker/gc_tuning.py): not a model's, so no model label.
    "jetinfer_gc_seconds_total": {"generation"},
    # Front processes started again (worker/fronts.py): the worker's, so no label.
    "jetinfer_front_restarts_total": set(),
}
# `jetinfer_<noun>_{total|seconds|bytes}`, and the unitless exceptions worker/metrics.py documents:
# counts with no unit (frames per batch, messages behind, requests in flight) and Prometheus' `_ratio`.
METRIC_NAME = re.compile(r"jetinfer_[a-z]+(_[a-z]+)*_(total|seconds|bytes)")
UNITLESS = {
    "jetinfer_batch_size",
    "jetinfer_consumer_lag",
    "jetinfer_inflight_requests",
    "jetinfer_gpu_utilization_ratio",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# -- helpers -------------------------------------------------------------------------------------------


def _get(url: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, in a thread: the worker under test runs on this loop."""
    return await asyncio.to_thread(_get, url, headers or {})


async def scrape(port: int) -> list[Sample]:
    """Every jetinfer_* sample of a worker's /metrics, parsed by prometheus-client's own parser.

    `*_created` samples (prometheus-client's per-series creation time, not a metric of ours) are left out.
    """
    status, content_type, body = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    return [
        sample
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name.startswith("jetinfer_") and not sample.name.endswith("_created")
    ]


def series(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    """The samples called `name` whose labels include `labels`."""
    return [s for s in samples if s.name == name and labels.items() <= s.labels.items()]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(s.value for s in series(samples, name, **labels))


def base_name(sample_name: str) -> str:
    """The metric a sample belongs to (`_bucket`, `_sum`, `_count` of histograms removed)."""
    for suffix in HISTOGRAM_SUFFIXES:
        stem = sample_name.removesuffix(suffix)
        if stem != sample_name and stem in WORKER_LABELS:
            return stem
    return sample_name


def keda_lag(monitor_url: str, stream: str, consumer: str, account: str = "$G") -> int:
    """The lag KEDA's nats-jetstream scaler computes, the way it computes it.

    kedacore/keda pkg/scalers/nats_jetstream_scaler.go: GET
    `/jsz?acc=<account>&consumers=true&config=true`, find the account in `account_details`, the stream
    in its `stream_detail`, the consumer by `name` in `consumer_detail`, and return
    `num_pending + num_ack_pending` (`getMaxMsgLag`; the stream's `last_seq` if the consumer is missing).
    """
    url = f"{monitor_url}/jsz?acc={account}&consumers=true&config=true"
    with urllib.request.urlopen(url.replace("$", "%24"), timeout=5) as response:
        data = json.load(response)
    for acc in data.get("account_details") or []:
        if acc["name"] != account:
            continue
        for detail in acc.get("stream_detail") or []:
            if detail["name"] != stream:
                continue
            for entry in detail.get("consumer_detail") or []:
                if entry["name"] == consumer:
                    return int(entry.get("num_pending", 0)) + int(entry.get("num_ack_pending", 0))
            return int(detail["state"]["last_seq"])
    raise AssertionError(f"stream {stream} not in {url}: {data}")


def requests_of(frames: int, value: float) -> np.ndarray:
    """One request body of the identity model: `frames` frames of FRAME values."""
    return np.full((frames, FRAME), value, np.float32)


# -- the worker's metrics under load -------------------------------------------------------------------


@pytest.fixture
def gc_clock() -> Iterator[None]:
    """The garbage collector timed, as `jetinfer serve` does (process-wide, so the worker itself does not)."""
    gc_tuning.clock.install()
    yield
    gc_tuning.clock.uninstall()


async def test_metrics_under_load_count_every_request_with_the_agreed_names_and_labels(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, gc_clock: None
) -> None:
    repo, model = model_repo("identity")
    port = free_port()
    frames = [1 + i % 3 for i in range(40)]  # 1, 2 or 3 frames per message: 80 frames in all
    bad_shape = [np.ones((1, 4, 4), np.float32)] * 3  # per-frame rank 2, the model takes rank 1
    too_big = [np.ones((9, FRAME), np.float32)] * 2  # 9 frames, max_batch is 8
    async with (
        running_worker(
            nats_server.url, repo, [model], metrics_port=port, metrics_host="127.0.0.1", max_batch=8
        ),
        Client(nats_server.url) as client,
    ):
        good = [client.infer(model, requests_of(n, i), timeout=30) for i, n in enumerate(frames)]
        bad = [client.infer(model, array, timeout=30) for array in bad_shape + too_big]
        load = asyncio.ensure_future(asyncio.gather(*good, *bad, return_exceptions=True))
        during = []  # scrapes while the requests are in flight: answered, and the counters only grow
        while not load.done():
            during.append(total(await scrape(port), "jetinfer_requests_total", model=model))
        results = await load
        for (i, n), reply in zip(enumerate(frames), results, strict=False):
            assert not isinstance(reply, BaseException), reply
            assert reply.outputs[0].to_numpy().shape == (n, FRAME)
            assert float(reply.outputs[0].to_numpy()[0, 0]) == float(i)
        errors = results[len(frames) :]
        assert [type(e) for e in errors] == [InvalidInputError] * 3 + [TooLargeError] * 2, errors
        await wait_until_answered(nc.jetstream(), model)
        samples = await scrape(port)

    mine = [s for s in samples if s.labels.get("model", model) == model]
    assert during
    assert during == sorted(during)
    assert during[-1] <= total(mine, "jetinfer_requests_total")
    # Request counters: one per request, ok and each error code apart; the good ones ran on version 1.
    by_status: dict[str, float] = defaultdict(float)
    for s in series(mine, "jetinfer_requests_total"):
        by_status[s.labels["status"]] += s.value
    assert dict(by_status) == {"ok": len(frames), "invalid_input": 3, "too_large": 2}
    assert total(mine, "jetinfer_requests_total", status="ok", version="1") == len(frames)
    # Every request is in the end-to-end histogram, under its status; its +Inf bucket holds them all.
    for status, count in by_status.items():
        assert total(mine, "jetinfer_request_duration_seconds_count", status=status) == count
        assert total(mine, "jetinfer_request_duration_seconds_bucket", status=status, le="+Inf") == count
    # Every request that reached the engine waited in the queue once; the batches carried every frame.
    assert total(mine, "jetinfer_queue_wait_seconds_count") == len(frames)
    assert total(mine, "jetinfer_batch_size_sum") == sum(frames)
    batches = total(mine, "jetinfer_batch_size_count")
    assert math.ceil(sum(frames) / 8) <= batches <= len(frames)
    assert total(mine, "jetinfer_inference_seconds_count") == batches
    assert total(mine, "jetinfer_batch_size_bucket", le="8.0") == batches  # no batch over max_batch
    assert total(mine, "jetinfer_inflight_requests") == 0
    assert total(mine, "jetinfer_reloads_total", status="loaded", version="1") == 1
    assert series(mine, "jetinfer_consumer_lag"), "the lag poll never ran"
    # Every stage's every activity has a series; the busy ones took time, none more than the run lasted.
    stage_seconds = {
        (s.labels["stage"], s.labels["activity"]): s.value
        for s in series(mine, "jetinfer_stage_seconds_total")
    }
    assert set(stage_seconds) == {(stage, a) for stage, acts in ACTIVITIES.items() for a in acts}
    for busy in (("form", "forming"), ("run", "running"), ("settle", "settling")):
        assert stage_seconds[busy] > 0, f"{busy} took no time"
    assert all(value >= 0 for value in stage_seconds.values())

    # Names and labels: exactly the agreed set for every series this worker exports.
    for s in samples:
        name = base_name(s.name)
        assert name in WORKER_LABELS, f"unexpected metric {s.name}"
        assert set(s.labels) - {"le"} == WORKER_LABELS[name], f"{s.name} has labels {sorted(s.labels)}"
        assert METRIC_NAME.fullmatch(name) or name in UNITLESS, f"{name} breaks the naming rule"
    assert {base_name(s.name) for s in mine} >= set(WORKER_LABELS) - {
        "jetinfer_gpu_utilization_ratio",
        "jetinfer_gpu_memory_used_bytes",
    }
    if GpuProbe().available:  # the lag poll reads NVML too
        assert series(samples, "jetinfer_gpu_memory_used_bytes", gpu="0")
    else:  # no GPU: the GPU series are absent, never a misleading zero
        assert not [s for s in samples if s.name.startswith("jetinfer_gpu_")]


def test_naming_rule_check_flags_a_bad_name() -> None:
    """The naming check above is not vacuous: names that break the rule fail it."""
    for name in ("jetinfer_requests", "jetinfer_latency_ms", "jetinfer_queue_wait_seconds_total_x"):
        assert not METRIC_NAME.fullmatch(name)
        assert name not in UNITLESS
    for name in ("jetinfer_requests_total", "jetinfer_gpu_memory_used_bytes"):
        assert METRIC_NAME.fullmatch(name)


# -- the lag gauge is what KEDA reads ------------------------------------------------------------------


async def test_lag_gauge_equals_what_kedas_scaler_reads(
    own_nats: EmbeddedNatsServer, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    held = tmp_path / "held-version"
    (repo / model / "1").rename(held)  # the worker starts with config.json only: it waits, serving nothing
    port = free_port()
    nc = await nats.connect(own_nats.url)
    js = nc.jetstream()
    # Register the model and its consumer the way a worker does, then queue requests nobody serves.
    streams = StreamSettings()
    await ensure_streams(js, streams)
    await register_model(js, model, streams)
    await ensure_consumer(js, model, streams)
    inbox = nc.new_inbox()
    replies = await nc.subscribe(f"{inbox}.*")
    queued = 9
    before_publish = time.time()
    async with Client(own_nats.url) as client:
        for i in range(queued):
            await client.publish(model, requests_of(1, i), request_id=f"lag-{i}", reply_to=f"{inbox}.{i}")
    try:
        async with running_worker(
            own_nats.url, repo, [model], metrics_port=port, metrics_host="127.0.0.1"
        ) as worker:
            # Three requests delivered and not yet acked: KEDA counts them (num_ack_pending) too.
            puller = await js.pull_subscribe_bind(durable=consumer_name(model), stream=INFER_STREAM)
            taken = await puller.fetch(3, timeout=5)
            assert len(taken) == 3
            await asyncio.sleep(0.3)  # let the oldest request age measurably
            await worker.update_lag()
            after_update = time.time()
            keda = await asyncio.to_thread(keda_lag, own_nats.monitor_url, INFER_STREAM, consumer_name(model))
            samples = await scrape(port)
            assert keda == queued
            assert total(samples, "jetinfer_consumer_lag", model=model) == keda
            age = total(samples, "jetinfer_oldest_request_age_seconds", model=model)
            assert 0.3 <= age <= after_update - before_publish

            # Give the taken ones back, put the version in place and signal: the worker serves them all.
            for msg in taken:
                await msg.nak()
            await puller.unsubscribe()
            held.rename(repo / model / "1")
            answer = json.loads((await nc.request(reload_subject(model), b"", timeout=30)).data)
            assert answer["status"] == "loaded", answer
            for _ in range(queued):
                await replies.next_msg(timeout=30)
            await wait_until_answered(js, model)
            await worker.update_lag()
            keda = await asyncio.to_thread(keda_lag, own_nats.monitor_url, INFER_STREAM, consumer_name(model))
            samples = await scrape(port)
            assert keda == 0
            assert total(samples, "jetinfer_consumer_lag", model=model) == 0
            assert series(samples, "jetinfer_oldest_request_age_seconds", model=model)[0].value == 0
    finally:
        await nc.close()


def test_keda_lag_reader_reads_the_fields_keda_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """The KEDA stand-in sums num_pending and num_ack_pending of the named consumer, as the scaler does."""
    payload = {
        "account_details": [
            {
                "name": "$G",
                "stream_detail": [
                    {
                        "name": "INFER",
                        "state": {"last_seq": 99},
                        "consumer_detail": [
                            {"name": "worker-a", "num_pending": 5, "num_ack_pending": 2, "num_waiting": 7},
                            {"name": "worker-b", "num_pending": 40, "num_ack_pending": 1},
                        ],
                    }
                ],
            }
        ]
    }
    seen: list[str] = []

    class Response:
        def __enter__(self) -> Response:
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def read(self, *args: object) -> bytes:
            return json.dumps(payload).encode()

    def fake_urlopen(url: str, timeout: float) -> Response:
        seen.append(url)
        return Response()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert keda_lag("http://nats:8222", "INFER", "worker-a") == 7
    assert keda_lag("http://nats:8222", "INFER", "worker-c") == 99  # KEDA's fallback: the stream's last_seq
    assert seen[0] == "http://nats:8222/jsz?acc=%24G&consumers=true&config=true"


# -- GPU gauges ----------------------------------------------------------------------------------------


class FakeNvml:
    """A stand-in for the `pynvml` module (unit tests of the NVML-to-gauge mapping only)."""

    def __init__(self, count: int = 2, *, init_error: Exception | None = None) -> None:
        self.count = count
        self.init_error = init_error
        self.utilization = {0: 37, 1: 100}
        self.used = {0: 1_500_000_000, 1: 70_000_000_000}
        self.refuse: set[tuple[int, str]] = set()
        self.shutdowns = 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # noqa: N802
        if (handle, "utilization") in self.refuse:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return SimpleNamespace(gpu=self.utilization[handle], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        if (handle, "memory") in self.refuse:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return SimpleNamespace(used=self.used[handle], total=80_000_000_000, free=0)


def gpu_samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """{(metric, gpu): value} of the GPU gauges, read back through the exposition format."""
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels["gpu"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("jetinfer_gpu_")
    }


def test_gpu_gauges_map_a_fake_nvml_module() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    nvml = FakeNvml()
    probe = GpuProbe(nvml)
    assert probe.available
    probe.update(metrics)
    assert gpu_samples(registry) == {
        ("jetinfer_gpu_utilization_ratio", "0"): 0.37,
        ("jetinfer_gpu_utilization_ratio", "1"): 1.0,
        ("jetinfer_gpu_memory_used_bytes", "0"): 1.5e9,
        ("jetinfer_gpu_memory_used_bytes", "1"): 7e10,
    }
    # A reading NVML refuses (utilisation on a MIG slice) drops that gauge, never leaving a stale value.
    nvml.refuse.add((1, "utilization"))
    nvml.utilization[0] = 5
    probe.update(metrics)
    assert gpu_samples(registry) == {
        ("jetinfer_gpu_utilization_ratio", "0"): 0.05,
        ("jetinfer_gpu_memory_used_bytes", "0"): 1.5e9,
        ("jetinfer_gpu_memory_used_bytes", "1"): 7e10,
    }
    probe.close()
    probe.close()
    assert nvml.shutdowns == 1
    assert not probe.available


@pytest.mark.parametrize(
    "nvml",
    [FakeNvml(init_error=RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED")), FakeNvml(count=0)],
    ids=["no driver", "no GPU"],
)
def test_gpu_gauges_are_absent_not_zero_without_a_gpu(nvml: FakeNvml) -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    probe = GpuProbe(nvml)
    assert not probe.available
    probe.update(metrics)
    assert gpu_samples(registry) == {}
    assert "jetinfer_gpu_utilization_ratio" in generate_latest(registry).decode()  # declared, no series


@pytest.mark.gpu
def test_nvml_reads_the_real_gpu() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    probe = GpuProbe()
    if not probe.available:
        pytest.skip("NVML finds no GPU here")
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    probe.update(metrics)
    readings = gpu_samples(registry)
    probe.close()
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        totals = [
            pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(count)
        ]
    finally:
        pynvml.nvmlShutdown()
    memory = {gpu: v for (name, gpu), v in readings.items() if name == "jetinfer_gpu_memory_used_bytes"}
    assert set(memory) == {str(i) for i in range(count)}
    for gpu, used in memory.items():
        assert 0 < used <= totals[int(gpu)]
    for (name, _gpu), value in readings.items():
        if name == "jetinfer_gpu_utilization_ratio":
            assert 0.0 <= value <= 1.0


# -- the client's own metrics --------------------------------------------------------------------------


async def test_client_metrics_count_sends_replies_timeouts_and_duplicates(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, unique: str
) -> None:
    repo, model = model_repo("identity")
    idle = f"idle-{unique}"  # registered, but no worker serves it: its requests time out
    streams = StreamSettings()
    js = nc.jetstream()
    await register_model(js, idle, streams)
    await ensure_consumer(js, idle, streams)
    prefix = f"_INBOX.metrics{unique}"
    sniffer = await nc.subscribe(f"{prefix}.>")  # sees the worker's replies, to send one again
    registry = CollectorRegistry()
    settings = ConnectionSettings(nats_url=nats_server.url, nats_inbox_prefix=prefix)
    good, bad, lost = 12, 4, 2
    async with (
        running_worker(nats_server.url, repo, [model]),
        Client(settings=settings, metrics=ClientMetrics(registry)) as client,
    ):
        results = await asyncio.gather(
            *(client.infer(model, requests_of(1, i), timeout=30) for i in range(good)),
            *(client.infer(model, np.ones((1, 2, 2), np.float32), timeout=30) for _ in range(bad)),
            *(client.infer(idle, requests_of(1, 0), timeout=0.5) for _ in range(lost)),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results[good:]] == ["InvalidInputError"] * bad + [
            "RequestTimeoutError"
        ] * lost
        assert all(isinstance(r, RequestTimeoutError) for r in results[good + bad :])
        with pytest.raises(UnknownModelError):
            await client.infer(f"nobody-{unique}", requests_of(1, 0), timeout=5)
        # At-least-once delivery: a reply that comes twice is dropped, and counted.
        # (the sniffer also sees JetStream's PubAcks, which come to the same inbox prefix)
        first = await sniffer.next_msg(timeout=5)
        while not (first.headers or {}).get(HEADER_STATUS):
            first = await sniffer.next_msg(timeout=5)
        await sniffer.unsubscribe()
        for _ in range(2):
            await nc.publish(first.subject, first.data, headers=first.headers)
        await nc.flush()
        deadline = time.monotonic() + 10
        while client.duplicates_dropped < 2:
            assert time.monotonic() < deadline, "the duplicate replies never reached the client"
            await asyncio.sleep(0.02)

    samples = [
        s
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if not s.name.endswith("_created")
    ]
    assert total(samples, "jetinfer_client_requests_total", model=model) == good + bad
    assert total(samples, "jetinfer_client_requests_total", model=idle) == lost
    assert not series(samples, "jetinfer_client_requests_total", model=f"nobody-{unique}")  # never sent
    assert total(samples, "jetinfer_client_replies_total", model=model, status="ok") == good
    assert total(samples, "jetinfer_client_replies_total", model=model, status="invalid_input") == bad
    assert total(samples, "jetinfer_client_replies_total", model=idle) == 0
    assert total(samples, "jetinfer_client_timeouts_total", model=idle) == lost
    assert total(samples, "jetinfer_client_timeouts_total", model=model) == 0
    assert total(samples, "jetinfer_client_duplicate_replies_total") == client.duplicates_dropped == 2
    for status, count in (("ok", good), ("invalid_input", bad)):
        assert total(samples, "jetinfer_client_request_duration_seconds_count", status=status) == count
        assert total(samples, "jetinfer_client_request_duration_seconds_sum", status=status) > 0
    # Every request sent ended as one reply or one timeout.
    assert total(samples, "jetinfer_client_requests_total") == total(
        samples, "jetinfer_client_replies_total"
    ) + total(samples, "jetinfer_client_timeouts_total")
    for s in samples:
        assert set(s.labels) - {"le"} <= {"model", "status"}, s
