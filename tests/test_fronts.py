"""`--fronts K`: front processes pull, prepare and answer on connections of their own, and the worker's
process runs their batches (issue 14: past one event loop's messages a second)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from jetinfer.embedded import EmbeddedNatsServer, free_port
from jetinfer.errors import RequestError
from jetinfer.labels import top_k
from jetinfer.producer.client import Client
from jetinfer.repository import ModelRepository, write_version
from jetinfer.settings import StreamSettings
from jetinfer.worker.front_link import (
    BatchDone,
    Hello,
    MetricsSnapshot,
    RemoteRequest,
    RunBatch,
    WireError,
    decode,
    encode,
)
from jetinfer.worker.fronts import front_count
from jetinfer.worker.settings import WorkerSettings
from tests import faults
from tests.conftest import CAT_CLASSES, NatsUnderTest, running_worker, wait_until_answered
from tests.test_delivery import Load, check, register
from tests.test_metrics import scrape
from tests.test_reload import served_version, wait_for
from tests.test_reload import signal as reload_signal


async def _metric(port: int, name: str, **labels: str) -> float:
    """A sample of the worker's /metrics (its own and its fronts' summed), 0 where it has none."""
    for sample in await scrape(port):
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return 0.0


def test_every_link_message_crosses_unchanged() -> None:
    settings = WorkerSettings(model=["m"], fronts=2, nats_creds_file=None)
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    request = RemoteRequest("r1", 1.5, None, 3, "image/jpeg", (b"\xff\xd8\xff",), {"x": array}, False)
    for message in (
        Hello(settings, 2, 20),
        RunBatch("m", 7, (request,)),
        BatchDone(7, "3", 1.0, 0.25, ({"y": array}, WireError("invalid_input", "bad"))),
        MetricsSnapshot(
            (("jetinfer_requests", "counter", "doc", (("jetinfer_requests_total", {"a": "b"}, 2.0),)),)
        ),
    ):
        back = decode(encode(message))
        if isinstance(message, RunBatch):
            assert isinstance(back, RunBatch)
            np.testing.assert_array_equal(back.requests[0].inputs["x"], array)
            assert back.requests[0].encoded == request.encoded
        elif isinstance(message, BatchDone):
            assert isinstance(back, BatchDone)
            first, second = back.results
            assert isinstance(first, dict)
            np.testing.assert_array_equal(first["y"], array)
            assert isinstance(second, WireError)
            assert isinstance(second.error(), RequestError)
            assert second.error().code == "invalid_input"
        else:
            assert back == message
    with pytest.raises(ConnectionError, match="does not know"):
        decode({"t": "exec", "code": "rm -rf /"})


async def test_fronts_answer_images_and_tensors_of_two_models_and_count_them_on_one_metrics(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    _, identity = model_repo("identity")
    tensors = 40
    port = free_port()
    async with (
        running_worker(
            nats_server.url, repo, [model, identity], fronts=2, metrics_port=port, metrics_host="127.0.0.1"
        ) as worker,
        Client(nats_server.url) as client,
    ):
        assert worker.fronts is not None
        assert worker.servers == {}  # nothing pulled in this process
        assert worker.readiness()[0], "a started worker serves through every front"
        serving = [sorted(f["serving"]) for f in worker.readiness()[1]["fronts"]]
        assert serving == [sorted([model, identity])] * 2
        by_jpeg = await client.infer(model, cat_jpeg, timeout=60)
        rng = np.random.default_rng(3)
        inputs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(tensors)]
        echoes = [rng.standard_normal((1 + i % 3, 256)).astype(np.float32) for i in range(tensors)]
        replies, echoed = await asyncio.gather(
            asyncio.gather(*(client.infer(model, x, timeout=60) for x in inputs)),
            asyncio.gather(*(client.infer(identity, x, timeout=60) for x in echoes)),
        )
        await wait_until_answered(client.js, model)
        await wait_until_answered(client.js, identity)
        # A front's metrics reach the worker's /metrics once a second.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            counted = await _metric(port, "jetinfer_requests_total", model=model, status="ok")
            counted_identity = await _metric(port, "jetinfer_requests_total", model=identity, status="ok")
            if counted >= tensors + 1 and counted_identity >= tensors:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.2)  # one more snapshot: nothing is counted twice
        counted = await _metric(port, "jetinfer_requests_total", model=model, status="ok")
        counted_identity = await _metric(port, "jetinfer_requests_total", model=identity, status="ok")
        batches = await _metric(port, "jetinfer_batch_size_count", model=model)
    top5 = {p.index for p in top_k(by_jpeg.output("logits")[0], k=5)}
    assert top5 & CAT_CLASSES, f"no cat in top-5 {top5}"
    assert all(r.output("logits").shape == (1, 1000) for r in replies)
    for sent, reply in zip(echoes, echoed, strict=True):
        np.testing.assert_array_equal(reply.output(), sent)  # each reply is its own request's, whole
    assert counted == tensors + 1, "each request counted once, by the front that settled it"
    assert counted_identity == tensors
    assert batches >= 1, "the engine counts the batches it ran"


def test_a_front_given_something_else_than_its_engine_says_so_in_one_line(tmp_path: Path) -> None:
    unknown = msgpack.packb({"t": "exec"})
    for sent, said in (
        (b"", "closed the link"),
        (struct.pack(">Q", len(unknown)) + unknown, "does not know"),
        (struct.pack(">Q", 1 << 40), "not a jetinfer link"),
    ):
        ours, theirs = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", "jetinfer.worker.front", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stderr=subprocess.PIPE,
        )
        theirs.close()
        ours.sendall(sent)
        ours.close()
        _, stderr = process.communicate(timeout=30)
        lines = stderr.decode().strip().splitlines()
        assert process.returncode == 2
        assert len(lines) == 1, lines
        assert lines[0].startswith("jetinfer front: error:")
        assert said in lines[0]


async def test_a_new_version_reaches_the_engine_and_its_fronts(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any
) -> None:
    repo, model = model_repo("identity")
    config = ModelRepository(repo).config(model)
    async with (
        running_worker(nats_server.url, repo, [model], fronts=2) as worker,
        Client(nats_server.url) as client,
    ):
        assert await served_version(client, model) == "1"
        write_version(repo, config, repo / model / "1" / "model.onnx", version=2)
        answer = await reload_signal(nc, model, 2)
        assert (answer["status"], answer["version"]) == ("loaded", 2), answer
        versions = {await served_version(client, model) for _ in range(20)}
        assert worker._sent_versions[model] == 2, "the fronts were sent the new version's config"
    assert versions == {"2"}


# -- faults ------------------------------------------------------------------------------------------


def _restarted_pids(worker: faults.WorkerProcess, number: int) -> list[int]:
    """The pids front `number` was started again with, in order."""
    found = re.findall(rf"front process {number} started again \(pid (\d+)\)", worker.log())
    return [int(pid) for pid in found]


@pytest.mark.slow
async def test_a_front_killed_mid_load_is_started_again_and_every_request_is_answered(
    own_nats: EmbeddedNatsServer, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    stream = {"ack_wait_s": 2}
    await register(own_nats.url, model, StreamSettings(**stream))
    settings = {**stream, "max_batch": 32, "fetch_batches": 8, "fronts": 2}
    worker = faults.WorkerProcess(own_nats.url, repo, model, tmp_path / "worker.log", settings)
    with faults.worker_processes(worker):
        worker.start()
        first, second = await worker.front_pids()
        async with Client(own_nats.url) as client:
            load = Load(client, model, 2000)
            await load.send(per_wave=500, pause_s=0)
            await load.wait_answered(50)
            os.kill(first, signal.SIGKILL)
            killed_at = time.monotonic()
            results = await load.results()
            await wait_for(
                lambda: bool(_restarted_pids(worker, 1)), "front 1 to be started again", limit_s=30
            )
            assert worker.process is not None
            assert worker.process.poll() is None, "the worker serves on"
            [again] = _restarted_pids(worker, 1)
            await served_version(client, model)  # served with the new front in place
            worker.terminate()
            code = await worker.wait(timeout_s=20)
    tally = faults.tally(load.markers, results, client.duplicates_dropped)
    tally.recover_s = load.recovery_s(killed_at)
    check(tally, "kill -9 of one of two fronts, started again")
    assert again not in (first, second)
    assert f"front process 1 (pid {first}) is gone" in worker.log()
    assert code == 0, worker.log()[-3000:]
    assert all(faults.exited(pid) for pid in (first, second, again))


@pytest.mark.slow
async def test_a_front_that_keeps_dying_stops_its_worker(
    own_nats: EmbeddedNatsServer, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    worker = faults.WorkerProcess(own_nats.url, repo, model, tmp_path / "worker.log", {"fronts": 2})
    with faults.worker_processes(worker):
        worker.start()
        victim, other = await worker.front_pids()
        for restarts in range(1, 5):
            os.kill(victim, signal.SIGKILL)
            if restarts == 4:
                break

            def restarted(times: int = restarts) -> bool:
                return len(_restarted_pids(worker, 1)) == times

            await wait_for(restarted, f"restart {restarts} of front 1", limit_s=30)
            victim = _restarted_pids(worker, 1)[-1]
        code = await worker.wait(timeout_s=30)
    assert code == 1, "three restarts within a minute, then the fourth death stops the worker"
    assert "3 restarts within 60 s: the worker stops" in worker.log()
    assert faults.exited(other)


@pytest.mark.slow
async def test_kill_9_of_the_engine_takes_its_fronts_with_it(
    own_nats: EmbeddedNatsServer, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    worker = faults.WorkerProcess(own_nats.url, repo, model, tmp_path / "engine.log", {"fronts": 2})
    with faults.worker_processes(worker):
        worker.start()
        await worker.ready()
        pids = await worker.front_pids()
        assert not any(faults.exited(pid) for pid in pids)
        worker.kill()
        await wait_for(
            lambda: all(faults.exited(pid) for pid in pids), "the fronts to die with their engine", limit_s=15
        )


def test_a_worker_chooses_fronts_for_an_image_model_on_a_gpu_with_cores_to_spare() -> None:
    chosen = WorkerSettings(model=["m"])
    assert front_count(chosen, image_model_on_gpu=True, cores=10, engine_rate=30_000)[0] == 2
    count, why = front_count(chosen, image_model_on_gpu=True, cores=8, engine_rate=10_400)
    assert count == 2
    assert "10,400 img/s" in why
    count, why = front_count(chosen, image_model_on_gpu=True, cores=4, engine_rate=30_000)
    assert count == 0
    assert "4 cores" in why
    assert front_count(chosen, image_model_on_gpu=False, cores=16, engine_rate=None)[0] == 0
    # --gpu-decode-lanes fixed: no rate measured, the choice the same.
    assert front_count(chosen, image_model_on_gpu=True, cores=16, engine_rate=None)[0] == 2
    given = WorkerSettings(model=["m"], fronts=3)
    assert front_count(given, image_model_on_gpu=False, cores=2, engine_rate=None) == (3, "--fronts")
    assert front_count(
        WorkerSettings(model=["m"], fronts=0), image_model_on_gpu=True, cores=16, engine_rate=30_000
    ) == (0, "--fronts")


async def test_a_front_started_again_is_counted_and_the_worker_ready_again(
    nats_server: NatsUnderTest, model_repo: Any
) -> None:
    repo, model = model_repo("identity")
    port = free_port()
    async with (
        running_worker(
            nats_server.url, repo, [model], fronts=2, metrics_port=port, metrics_host="127.0.0.1"
        ) as worker,
        Client(nats_server.url) as client,
    ):
        assert await _metric(port, "jetinfer_front_restarts_total") == 0
        [first, second] = [f["pid"] for f in worker.readiness()[1]["fronts"]]
        os.kill(first, signal.SIGKILL)

        def replaced() -> bool:
            ready, details = worker.readiness()
            return ready and first not in [f["pid"] for f in details["fronts"]]

        await wait_for(replaced, "front 1 to be started again and the worker ready", limit_s=30)
        restarts = await _metric(port, "jetinfer_front_restarts_total")
        answered = [await served_version(client, model) for _ in range(10)]
        assert second in [f["pid"] for f in worker.readiness()[1]["fronts"]]
    assert restarts == 1
    assert answered == ["1"] * 10
