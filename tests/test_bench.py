"""`jetinfer bench`: statistics on known distributions, and a short real run with both baselines (issue 7)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer.bench.load import BenchPoint, round_ratios, summarize
from tests.conftest import run_cli


def test_percentiles_of_a_known_uniform_distribution() -> None:
    latencies = [ms / 1000 for ms in range(1, 1001)]  # 1..1000 ms, shuffled
    np.random.default_rng(1).shuffle(latencies)
    summary = summarize(latencies, elapsed_s=2.0, frames_per_request=4, errors=Counter({"internal": 3}))
    assert summary.requests == 1000
    assert summary.frames == 4000
    assert summary.requests_per_s == pytest.approx(500.0)
    assert summary.frames_per_s == pytest.approx(2000.0)
    assert summary.p50_ms == pytest.approx(500.0)
    assert summary.p90_ms == pytest.approx(900.0)
    assert summary.p99_ms == pytest.approx(990.0)
    assert summary.max_ms == pytest.approx(1000.0)
    assert summary.mean_ms == pytest.approx(500.5)
    assert summary.errors == {"internal": 3}


def test_percentiles_of_a_known_exponential_sample() -> None:
    rng = np.random.default_rng(2)
    latencies = rng.exponential(0.010, 200_000).tolist()  # mean 10 ms
    summary = summarize(latencies, elapsed_s=1.0)
    assert summary.p50_ms == pytest.approx(10 * math.log(2), rel=0.02)
    assert summary.p99_ms == pytest.approx(10 * math.log(100), rel=0.03)
    assert summary.mean_ms == pytest.approx(10.0, rel=0.02)


def test_empty_sample_is_nan_not_a_crash() -> None:
    summary = summarize([], elapsed_s=1.0, errors=Counter({"RequestTimeoutError": 2}))
    assert summary.requests == 0
    assert math.isnan(summary.p50_ms)
    assert summary.errors == {"RequestTimeoutError": 2}


def _identity_bench(repository: Path, *args: str) -> Any:
    """`jetinfer bench --embedded --bare` on the identity model with 1 KB tensors, plus `args`."""
    common = ["--repository", str(repository), "--model", "identity", "--payload", "tensor", "--shape", "256"]
    return run_cli("bench", "--embedded", *common, "--bare", *args)


def test_short_embedded_run_with_both_baselines(demo_repository: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    plot_path = tmp_path / "plot.png"
    result = _identity_bench(
        demo_repository,
        "--concurrency",
        "4",
        "16",
        "--duration-s",
        "1",
        "--warmup-s",
        "0.5",
        "--engine-only",
        "--engine-batch",
        "16",
        "--json",
        str(report_path),
        "--plot",
        str(plot_path),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    modes = Counter(point["mode"] for point in report["points"])
    assert modes == {"worker": 2, "bare": 2}
    for point in report["points"]:
        assert point["summary"]["requests"] > 0
        assert point["summary"]["errors"] == {}
    worker_points = [p for p in report["points"] if p["mode"] == "worker"]
    assert all(p["batches"] and p["mean_batch"] >= 1 for p in worker_points)
    for point in worker_points:  # the worker's own timings of its replies, for the idle breakdown
        timing = point["worker_timing_p50_ms"]
        assert set(timing) == {"queue_ms", "infer_ms", "total_ms"}
        assert 0 < timing["infer_ms"] <= timing["total_ms"] <= point["summary"]["max_ms"]
    assert report["engine_only"][0]["batch"] == 16
    assert "ratio worker/bare loop" in result.stdout
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_round_ratios_compare_within_each_round() -> None:
    """A slow second round lowers both worker and bare loop: its ratio stays its own."""

    def point(mode: str, load: int, rate: float, number: int) -> BenchPoint:
        summary = summarize([0.01] * int(rate), 1.0)
        return BenchPoint(mode, load, summary, round=number)

    points = [
        point("worker", 64, 900, 1),
        point("worker", 256, 1000, 1),
        point("bare", 256, 1250, 1),
        point("worker", 256, 500, 2),
        point("bare", 256, 800, 2),
    ]
    engine = [
        {"batch": 8, "frames_per_s": 2000.0, "round": 1},
        {"batch": 8, "frames_per_s": 1000.0, "round": 2},
    ]
    ratios = round_ratios(points, engine)
    assert ratios["worker/bare loop"] == pytest.approx([0.8, 0.625])
    assert ratios["worker/engine-only"] == pytest.approx([0.5, 0.5])


def test_rounds_alternate_the_worker_and_the_bare_loop(demo_repository: Path) -> None:
    result = _identity_bench(
        demo_repository,
        "--concurrency",
        "8",
        "--duration-s",
        "0.5",
        "--warmup-s",
        "0.2",
        "--rounds",
        "2",
        "--json",
        "-",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert [(p["round"], p["mode"]) for p in report["points"]] == [
        (1, "worker"),
        (1, "bare"),
        (2, "worker"),
        (2, "bare"),
    ]
    assert "ratio worker/bare loop per round:" in report["table"]
    assert "median" in report["table"]


async def test_open_loop_sends_at_the_rate_asked(nats_server: Any, model_repo: Any) -> None:
    from jetinfer.bench.load import open_loop
    from jetinfer.producer.client import Client
    from tests.conftest import running_worker

    repo, model = model_repo("identity")
    payload = np.ones((1, 16), np.float32)
    async with running_worker(nats_server.url, repo, [model]), Client(nats_server.url) as client:
        latencies, errors, _ = await open_loop(client, model, payload, rate=200.0, duration_s=0.5)
    assert len(latencies) == 100  # rate x duration requests, each answered
    assert not errors
