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


def _identity_args(repository: Path) -> list[str]:
    """`jetinfer bench` arguments for the identity model of `repository` with 1 KB tensors."""
    return ["--repository", str(repository), "--model", "identity", "--payload", "tensor", "--shape", "256"]


def _identity_bench(repository: Path, *args: str) -> Any:
    """`jetinfer bench --embedded --bare` on the identity model with 1 KB tensors, plus `args`."""
    return run_cli("bench", "--embedded", *_identity_args(repository), "--bare", *args)


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


def test_a_backlog_is_stored_first_then_every_request_answered_and_timed(
    demo_repository: Path, tmp_path: Path
) -> None:
    report_path = tmp_path / "report.json"
    common = _identity_args(demo_repository)
    result = run_cli(
        "bench",
        "--embedded",
        *common,
        "--backlog",
        "2000",
        "--bare",
        "--json",
        str(report_path),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    point, bare = json.loads(report_path.read_text())["points"]
    assert (point["mode"], bare["mode"]) == ("backlog", "bare-backlog")
    for summary in (point["summary"], bare["summary"]):
        assert summary["requests"] == 2000  # every stored request answered, none twice
        assert summary["errors"] == {}
        assert summary["frames_per_s"] > 0
    # `jetinfer serve` times its garbage collector (jetinfer_gc_seconds_total); a bare loop has no metrics.
    assert point["gc_ms_per_request"] >= 0
    assert bare["gc_ms_per_request"] is None
    assert "garbage collection: " in result.stdout
    # Stored before the worker started: its batches were full, not the trickle of a closed loop.
    assert point["mean_batch"] > 8
    # Where its stages spent their time: each stage's shares add up to the whole.
    shares = point["stage_shares"]
    assert set(shares) == {"form", "run", "settle"}
    for stage in shares.values():
        assert math.isclose(sum(stage.values()), 1.0)
    assert shares["run"]["running"] > 0
    assert "run stage: " in result.stdout


def test_a_backlog_needs_the_embedded_stack() -> None:
    from jetinfer.bench.settings import BenchSettings
    from jetinfer.errors import SettingsError

    with pytest.raises(SettingsError, match="--embedded"):
        BenchSettings(backlog=100)
    with pytest.raises(SettingsError, match="at least 10"):
        BenchSettings(embedded=True, backlog=5)


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


# -- issue 16.5: a failed run fails; the embedded stack dies with the bench ------------------------------


def test_bench_of_a_model_nobody_serves_fails_at_once(nats_server: Any, unique: str) -> None:
    result = run_cli(
        "bench",
        "--nats-url",
        nats_server.url,
        "--model",
        f"nosuch-{unique}",
        "--payload",
        "tensor",
        "--shape",
        "4",
        "--duration-s",
        "60",
        "--no-progress",
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"no worker has registered model 'nosuch-{unique}'" in line
    assert "nan" not in result.stdout


def test_embedded_bench_of_a_model_the_repository_lacks_names_the_flag(demo_repository: Path) -> None:
    result = run_cli("bench", "--embedded", "--repository", str(demo_repository), "--model", "nosuch")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--model" in line
    assert "has no model 'nosuch'" in line
    assert "identity" in line  # what it does have


def test_a_run_whose_requests_failed_is_a_failure() -> None:
    from jetinfer.bench.load import run_failures

    def point(ok: int, errors: dict[str, int]) -> BenchPoint:
        return BenchPoint("worker", 8, summarize([0.01] * ok, 1.0, errors=Counter(errors)))

    assert run_failures([point(100, {})], 0.01) == []
    assert run_failures([point(1000, {"RequestTimeoutError": 5})], 0.01) == []
    (every,) = run_failures([point(0, {"unknown_model": 13593})], 0.01)
    assert "every request failed" in every
    (many,) = run_failures([point(90, {"internal": 10})], 0.01)
    assert "10 of 100 requests failed" in many
    assert "--max-error-ratio" in many
    assert run_failures([point(90, {"internal": 10})], 0.2) == []


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        table[int(entry.name)] = (int(ppid), state, cmdline)
    return table


def _alive(pid: int) -> bool:
    info = _processes().get(pid)
    return info is not None and info[1] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_kill_9_of_an_embedded_bench_takes_its_children_and_temp_folder_along(demo_repository: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    bench = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jetinfer.cli",
            "bench",
            "--embedded",
            *_identity_args(demo_repository),
            "--concurrency",
            "2",
            "--duration-s",
            "300",
            "--warmup-s",
            "0.2",
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the nats-server and a ready worker: the run has begun
            children = {p: cmd for p, (ppid, _, cmd) in _processes().items() if ppid == bench.pid}
            if any("nats-server" in c for c in children.values()) and any(
                " serve " in c for c in children.values()
            ):
                break
            assert bench.poll() is None, "the bench ended before its stack was up"
            time.sleep(0.2)
        (nats_cmd,) = [c for c in children.values() if "nats-server" in c]
        store = Path(nats_cmd.split(" -c ", 1)[1].split()[0]).parent
        assert store.is_dir()
        time.sleep(1.0)  # let the worker start taking load
        os.kill(bench.pid, signal.SIGKILL)
        bench.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (any(_alive(p) for p in children) or store.exists()):
            time.sleep(0.1)
        survivors = {p: c for p, c in children.items() if _alive(p)}
        assert not survivors, f"children of the killed bench still run: {survivors}"
        assert not store.exists(), f"the killed bench's temporary folder {store} is still there"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_worker_cpus_are_a_taskset_list_and_leave_the_load_a_cpu() -> None:
    import os

    from jetinfer.bench.settings import BenchSettings, parse_cpus
    from jetinfer.errors import SettingsError

    assert parse_cpus("0-3,8") == {0, 1, 2, 3, 8}
    with pytest.raises(ValueError, match="'x'"):
        parse_cpus("0,x")
    every = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    with pytest.raises(SettingsError, match="worker_cpus"):
        BenchSettings(embedded=True, worker_cpus=every)
    with pytest.raises(SettingsError, match="--embedded"):
        BenchSettings(worker_cpus="0")
