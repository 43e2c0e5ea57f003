"""Hot reload (issue 4): new versions reach running workers without one failed request; broken ones are
refused while the old version keeps serving; old engines are really released; a worker that starts with
nothing to serve becomes ready as soon as a version arrives; a starting worker falls back within the
version policy."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io
import itertools
import json
import logging
import shutil
import socket
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from jetinfer.builder.demo_models import write_identity_onnx
from jetinfer.builder.sidecar import Sidecar, SidecarSettings
from jetinfer.errors import RepositoryError, SettingsError, UnknownModelError
from jetinfer.producer.client import Client
from jetinfer.repository import ModelConfig, ModelRepository, TensorSpec, write_version
from jetinfer.streams import INFER_STREAM, consumer_name, reload_subject
from jetinfer.worker.metrics import WorkerMetrics
from jetinfer.worker.reload import LoadedModel, ModelSlot, ReloadResult
from jetinfer.worker.settings import WorkerSettings
from tests.conftest import NatsUnderTest, running_worker

# -- helpers ---------------------------------------------------------------------------------------------


async def wait_for(condition: Callable[[], bool], what: str, *, limit_s: float = 60.0) -> None:
    """Wait until `condition()` holds (a generous limit, so a hang fails instead of blocking the run)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


def reloads(worker: Any, model: str, version: int, status: str) -> float:
    """jetinfer_reloads_total{model, version, status} of one worker."""
    labels = {"model": model, "version": str(version), "status": status}
    return worker.registry.get_sample_value("jetinfer_reloads_total", labels) or 0.0


async def signal(nc: Any, model: str, version: int) -> dict[str, Any]:
    """Send the reload signal the way the sidecar does and return the (only) worker's answer."""
    body = json.dumps({"model": model, "version": version}).encode()
    answer = await nc.request(reload_subject(model), body, timeout=30)
    result: dict[str, Any] = json.loads(answer.data)
    return result


def edit_manifest(version_path: Path, **changes: Any) -> None:
    manifest = json.loads((version_path / "manifest.json").read_text())
    manifest.update(changes)
    (version_path / "manifest.json").write_text(json.dumps(manifest))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get_readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def served_version(client: Client, model: str) -> str:
    """Send one request; check the identity model echoed it; return the version that served it."""
    payload = np.arange(8, dtype=np.float32)[None]
    reply = await client.infer(model, payload, timeout=60)
    np.testing.assert_array_equal(reply.output(), payload)
    return reply.model_version


def sidecar_settings(url: str, source: Path, repo: Path, **overrides: Any) -> SidecarSettings:
    return SidecarSettings(
        nats_url=url, source=source, repository=repo, **{"answer_wait_s": 0.5, "poll_s": 0.1, **overrides}
    )


async def publish_through(sidecar: Sidecar, model: str, version: int) -> Any:
    """Scan until the sidecar has taken `version` (the first scan only sees it; the next takes it)."""
    for _ in range(20):
        result = await sidecar.poll()
        if any(p.model == model and p.version == version for p in result.published):
            return result
        assert not result.refused, result.refused
    raise AssertionError(f"the sidecar never published {model} v{version}")


# -- hot reload under load -------------------------------------------------------------------------------

LANES = 48
AT_LEAST = 2000
NEW_VERSIONS = range(2, 7)


async def test_hot_reload_under_load_fails_no_request_and_versions_only_move_forward(
    nats_server: NatsUnderTest, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    config = ModelRepository(repo).config(model)
    # Every new version is the same file: the version number in each reply tells them apart.
    onnx = repo / model / "1" / "model.onnx"
    source = tmp_path / "source"
    source.mkdir()
    printed = io.StringIO()
    used: dict[str, list[int]] = {}  # per worker: the version of each batch, in the order batches ran
    # Per reply, in completion order: (the version every worker served when it was sent, the version
    # that answered it).
    replies: list[tuple[int, str]] = []
    floor = 1
    stop = asyncio.Event()

    def record(worker: Any) -> None:
        slot = worker.slots[model]
        acquire = slot.acquire
        batches = used.setdefault(worker.settings.worker_id, [])

        def counted() -> LoadedModel:
            loaded: LoadedModel = acquire()
            batches.append(loaded.number)
            return loaded

        slot.acquire = counted

    async with (
        running_worker(nats_server.url, repo, [model], worker_id="w-a", max_wait_ms=2.0) as worker_a,
        running_worker(nats_server.url, repo, [model], worker_id="w-b", max_wait_ms=2.0) as worker_b,
        Client(nats_server.url) as client,
        Sidecar(sidecar_settings(nats_server.url, source, repo), out=printed) as sidecar,
    ):
        workers = (worker_a, worker_b)
        for worker in workers:
            record(worker)

        async def lane(k: int) -> None:
            sequence = 0
            while not stop.is_set():
                sent_when = floor
                payload = np.full((1, 8), k * 1_000_000 + sequence, dtype=np.float32)
                reply = await client.infer(model, payload, timeout=60)
                np.testing.assert_array_equal(reply.output(), payload)
                replies.append((sent_when, reply.model_version))
                sequence += 1

        lanes = [asyncio.create_task(lane(k)) for k in range(LANES)]

        def progressed(count: int) -> Callable[[], bool]:
            def check() -> bool:
                for task in lanes:
                    if task.done():
                        task.result()  # a failed request fails the test here, with its error
                return len(replies) >= count

            return check

        try:
            await wait_for(progressed(100), "the first replies")
            per_phase = AT_LEAST // (len(NEW_VERSIONS) + 1)
            for version in NEW_VERSIONS:
                write_version(source, config, onnx, version=version)
                result = await publish_through(sidecar, model, version)
                for answer in result.answers.get(model, []):
                    assert (answer.status, answer.version) == ("loaded", version), answer
                await wait_for(
                    lambda v=version: all(w.slots[model].current.number == v for w in workers),
                    f"both workers on version {version}",
                )
                floor = version
                await wait_for(progressed(len(replies) + per_phase), f"load on version {version}")
            await wait_for(progressed(AT_LEAST), f"{AT_LEAST} replies")
        finally:
            stop.set()
            outcomes = await asyncio.gather(*lanes, return_exceptions=True)
        # No request failed on a worker and was quietly retried: each delivered once, no batch re-ran.
        consumer = await client.js.consumer_info(INFER_STREAM, consumer_name(model))
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, f"{len(failures)} lanes failed, first: {failures[0]!r}"
    assert consumer.delivered.consumer_seq == len(replies), "some requests were delivered more than once"
    assert [w.servers[model].isolated_runs for w in workers] == [0, 0]
    assert len(replies) >= AT_LEAST
    versions = [int(v) for _, v in replies]  # every reply is tagged with a version number
    assert set(versions) <= {1, *NEW_VERSIONS}
    assert set(versions) >= set(NEW_VERSIONS), "the load did not span every new version"
    late = [(sent, v) for sent, v in replies if int(v) < sent]
    assert not late, f"requests sent after every worker served a version got an older one: {late[:5]}"
    for worker_id, batches in used.items():
        assert batches, f"worker {worker_id} ran no batch"
        backwards = [(a, b) for a, b in itertools.pairwise(batches) if b < a]
        assert not backwards, (
            f"worker {worker_id} went back from version {backwards[0][0]} to {backwards[0][1]}"
        )
    for worker in workers:
        for version in NEW_VERSIONS:
            assert reloads(worker, model, version, "loaded") == 1
            assert reloads(worker, model, version, "refused") == 0
    assert f"published {model} v6" in printed.getvalue()


# -- refusals --------------------------------------------------------------------------------------------


async def test_broken_versions_are_refused_with_their_reason_while_the_old_one_serves(
    nats_server: NatsUnderTest, model_repo: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo, model = model_repo("identity")
    config = ModelRepository(repo).config(model)
    good = repo / model / "1" / "model.onnx"
    full = good.read_bytes()
    source = tmp_path / "source"
    source.mkdir()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not an onnx protobuf" * 64)
    printed = io.StringIO()
    nc = await nats.connect(nats_server.url)
    caplog.set_level(logging.ERROR, logger="jetinfer.worker.reload")
    try:
        async with (
            running_worker(nats_server.url, repo, [model], worker_id="w-old") as worker,
            Client(nats_server.url) as client,
            Sidecar(
                sidecar_settings(nats_server.url, source, repo, answer_wait_s=3.0), out=printed
            ) as sidecar,
        ):
            assert await served_version(client, model) == "1"

            # 1. A corrupt model file with a matching checksum passes the sidecar and fails to load.
            write_version(source, config, garbage, version=2)
            result = await publish_through(sidecar, model, 2)
            [answer] = result.answers[model]
            assert (answer.worker, answer.status, answer.version) == ("w-old", "refused", 1)
            assert "v2: ModelLoadError" in answer.message
            assert "onnxruntime cannot load it" in answer.message
            assert f"{model} v2: worker w-old refused v1: v2: ModelLoadError" in printed.getvalue()

            # 2. A checksum that does not match the file. 3. A manifest naming the wrong backend for its
            # file. 4. A half-written version: the manifest is there, the model file stopped half way.
            cases: list[tuple[int, Callable[[Path], None], str]] = [
                (
                    3,
                    lambda p: edit_manifest(p, sha256="0" * 64),
                    "checksum mismatch: manifest says 000000000000",
                ),
                (
                    4,
                    lambda p: edit_manifest(p, backend="tensorrt"),
                    "backend 'tensorrt' does not match model.onnx",
                ),
                (5, lambda p: (p / "model.onnx").write_bytes(full[: len(full) // 2]), "checksum mismatch"),
            ]
            for number, damage, reason in cases:
                damage(write_version(repo, config, good, version=number).path)
                answer_body = await signal(nc, model, number)
                assert answer_body["status"] == "refused"
                assert answer_body["version"] == 1
                assert f"v{number}: RepositoryError" in answer_body["message"]
                assert reason in answer_body["message"]
                assert answer_body["message"].endswith("; version 1 keeps serving")
                assert reloads(worker, model, number, "refused") == 1
                assert reloads(worker, model, number, "loaded") == 0
                assert f"refused version {number}: RepositoryError" in caplog.text
                assert "(serving version 1 stays)" in caplog.text
                assert reason in worker.readiness()[1]["models"][model]["refused"][str(number)]
                assert await served_version(client, model) == "1"

            # A refused version is remembered: asking again neither reloads nor counts it again.
            again = await signal(nc, model, 5)
            assert again["status"] == "refused"
            assert reloads(worker, model, 5, "refused") == 1

            # A hidden temporary folder (a write still in progress) is not a version at all.
            hidden = repo / model / ".tmp-6-0badc0de"
            shutil.copytree(repo / model / "1", hidden)
            assert (await signal(nc, model, 6))["version"] == 1
            assert reloads(worker, model, 6, "refused") == reloads(worker, model, 6, "loaded") == 0
            assert await served_version(client, model) == "1"

            # The interrupted copy completes: its files changed, so it is looked at again and loads.
            (repo / model / "5" / "model.onnx").write_bytes(full)
            done = await signal(nc, model, 5)
            assert (done["status"], done["version"]) == ("loaded", 5)
            assert reloads(worker, model, 5, "loaded") == 1
            assert await served_version(client, model) == "5"
            assert worker.readiness()[1]["models"][model] == {
                "loaded": True,
                "version": 5,
                "backend": "onnxruntime",
            }
    finally:
        await nc.drain()


# -- names that are ignored ------------------------------------------------------------------------------


async def test_bad_model_names_and_non_numeric_version_folders_are_ignored_with_a_warning(
    nats_server: NatsUnderTest, model_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    repo, model = model_repo("identity")
    for bad in ("Bad.Name", "has space", "..escape"):
        folder = repo / bad
        folder.mkdir(exist_ok=True)
        shutil.copy(repo / model / "config.json", folder / "config.json")
    for odd in ("latest", "01", "2a"):
        shutil.copytree(repo / model / "1", repo / model / odd)
    caplog.set_level(logging.WARNING)
    async with running_worker(nats_server.url, repo, []) as worker, Client(nats_server.url) as client:
        assert worker.models == [model]
        assert worker.readiness()[1]["models"][model]["version"] == 1
        assert await served_version(client, model) == "1"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for bad in ("Bad.Name", "has space"):
        assert any(bad in w and "not a valid model name" in w for w in warned), warned
    for odd in ("latest", "01", "2a"):
        assert any(w.endswith(f"/{odd}: version folders are positive integers") for w in warned), warned

    metrics = WorkerMetrics(CollectorRegistry())
    for traversal in ("../etc", "..", "a/../../b", "/abs", "x/y"):
        with pytest.raises(RepositoryError, match="invalid model name"):
            ModelSlot(traversal, repo, metrics=metrics)
        with pytest.raises(SettingsError, match="model"):
            WorkerSettings(repository=repo, model=[traversal])


# -- memory ----------------------------------------------------------------------------------------------

WEIGHT_SHAPE = (1024, 4096)  # a 16 MiB initializer: a leaked engine per reload would show at once


def write_weighted_onnx(path: Path) -> ModelConfig:
    """An ONNX model with a 16 MiB weight: output = input @ W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal(WEIGHT_SHAPE).astype(np.float32) * 0.01
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["output"])],
        "weighted",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WEIGHT_SHAPE[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", WEIGHT_SHAPE[1]])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return ModelConfig(
        name="weighted",
        max_batch=4,
        inputs=(TensorSpec("input", "FP32", (WEIGHT_SHAPE[0],)),),
        outputs=(TensorSpec("output", "FP32", (WEIGHT_SHAPE[1],)),),
    )


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def test_memory_does_not_grow_across_20_reloads(tmp_path: Path) -> None:
    onnx = tmp_path / "weighted.onnx"
    config = write_weighted_onnx(onnx)
    model_bytes = onnx.stat().st_size
    repo = tmp_path / "repo"
    slot = ModelSlot("weighted", repo, metrics=WorkerMetrics(CollectorRegistry()))
    batch = {"input": np.ones((2, WEIGHT_SHAPE[0]), np.float32)}
    sessions: list[weakref.ref[Any]] = []
    backends: list[Any] = []
    rss = []
    try:
        for number in range(1, 21):
            write_version(repo, config, onnx, version=number, keep=2)
            result = await slot.refresh()
            assert (result.status, result.version) == ("loaded", number), result
            loaded = slot.acquire()
            try:
                assert loaded.backend.infer(batch)["output"].shape == (2, WEIGHT_SHAPE[1])
            finally:
                slot.release(loaded)
            sessions.append(weakref.ref(loaded.backend._session))
            backends.append(weakref.ref(loaded.backend))
            del loaded
            gc.collect()
            rss.append(rss_bytes())
        # Every replaced version was closed and its ONNX Runtime session freed.
        assert [ref() is None for ref in sessions] == [True] * 19 + [False]
        assert all(ref() is None or ref()._closed for ref in backends[:-1])
        # The allocator keeps or returns freed pages as it likes, so single samples swing by a model size
        # or two; a leak raises the floor. Lowest RSS of reloads 18-20 against that of reloads 9-11: an
        # engine kept per reload adds ten model sizes or more (its weights and their prepacked copies),
        # so a bound of four model sizes tells a leak from the allocator's moods.
        growth = min(rss[17:20]) - min(rss[8:11])
        assert growth < 4 * model_bytes, (
            f"RSS grew by {growth / 2**20:.1f} MiB from reloads 9-11 to 18-20 of a {model_bytes / 2**20:.1f} "
            f"MiB model: {[round(r / 2**20) for r in rss]} MiB"
        )
    finally:
        slot.close()
        slot.close()


async def test_batches_in_flight_finish_on_the_old_version_which_closes_after_the_last(
    tmp_path: Path,
) -> None:
    onnx = tmp_path / "identity.onnx"
    config = dataclasses.replace(write_identity_onnx(onnx), name="inflight")
    repo = tmp_path / "repo"
    write_version(repo, config, onnx, version=1)
    slot = ModelSlot("inflight", repo, metrics=WorkerMetrics(CollectorRegistry()))
    assert (await slot.refresh()).version == 1
    first, second = slot.acquire(), slot.acquire()
    write_version(repo, config, onnx, version=2)
    assert (await slot.refresh()).status == "loaded"
    newer = slot.acquire()
    assert newer.number == 2  # new batches take the new version
    assert slot.describe()["draining"] == [1]
    old_session = weakref.ref(first.backend._session)
    frames = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(first.backend.infer({"input": frames})["output"], frames)  # still usable
    slot.release(first)
    assert not first.backend._closed
    slot.release(second)  # the last batch on version 1 returns: now it closes
    assert first.backend._closed
    assert old_session() is None
    assert "draining" not in slot.describe()
    slot.release(newer)
    slot.close()
    assert newer.backend._closed


# -- starting with nothing to serve ----------------------------------------------------------------------


def empty_model(repo: Path, model: str) -> None:
    """Leave only config.json: the model is declared, no version has arrived."""
    shutil.rmtree(repo / model / "1")


async def test_a_worker_started_on_an_empty_repository_is_ready_when_the_sidecar_brings_a_version(
    nats_server: NatsUnderTest, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    onnx = tmp_path / "identity.onnx"
    shutil.copy(repo / model / "1" / "model.onnx", onnx)
    config = ModelRepository(repo).config(model)
    empty_model(repo, model)
    source = tmp_path / "source"
    source.mkdir()
    port = free_port()
    async with (
        running_worker(
            nats_server.url, repo, [model], worker_id="w-new", metrics_port=port, metrics_host="127.0.0.1"
        ) as worker,
        Client(nats_server.url) as client,
        Sidecar(
            sidecar_settings(nats_server.url, source, repo, answer_wait_s=3.0), out=io.StringIO()
        ) as sidecar,
    ):
        ready, detail = worker.readiness()
        assert not ready
        assert detail["models"][model] == {"loaded": False, "problem": "no version in the repository yet"}
        status, body = await asyncio.to_thread(get_readyz, port)
        assert (status, body["ready"]) == (503, False)
        with pytest.raises(UnknownModelError):  # registered only once a version loads: fails at once
            await served_version(client, model)
        write_version(source, config, onnx, version=1)
        result = await publish_through(sidecar, model, 1)
        assert [(a.worker, a.status, a.version) for a in result.answers[model]] == [("w-new", "loaded", 1)]
        assert worker.readiness()[0]
        status, body = await asyncio.to_thread(get_readyz, port)
        assert status == 200
        assert body["models"][model] == {"loaded": True, "version": 1, "backend": "onnxruntime"}
        assert await served_version(client, model) == "1"


async def test_a_worker_started_on_an_empty_repository_finds_its_first_version_by_polling(
    nats_server: NatsUnderTest, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    onnx = tmp_path / "identity.onnx"
    shutil.copy(repo / model / "1" / "model.onnx", onnx)
    config = ModelRepository(repo).config(model)
    shutil.rmtree(repo / model)  # nothing at all yet: not even the model's folder
    async with (
        running_worker(nats_server.url, repo, [model], reload_poll_s=0.1) as worker,
        Client(nats_server.url) as client,
    ):
        ready, detail = worker.readiness()
        assert not ready
        assert detail["models"][model] == {"loaded": False, "problem": "no version in the repository yet"}
        write_version(repo, config, onnx, version=1)  # no signal: only the poll can find it
        await wait_for(lambda: worker.readiness()[0], "the poll to load version 1")
        assert worker.readiness()[1]["models"][model]["version"] == 1
        assert await served_version(client, model) == "1"


# -- which version a starting worker serves --------------------------------------------------------------


def policy_repo(
    tmp_path: Path, policy: dict[str, Any], broken: set[int], versions: int = 3
) -> tuple[Path, str]:
    """Versions 1..`versions` of the identity model, those in `broken` with a wrong checksum."""
    onnx = tmp_path / "identity.onnx"
    config = dataclasses.replace(write_identity_onnx(onnx), name="policy", version_policy=policy)
    repo = tmp_path / "repo"
    for number in range(1, versions + 1):
        written = write_version(repo, config, onnx, version=number)
        if number in broken:
            edit_manifest(written.path, sha256="f" * 64)
    return repo, "policy"


async def start(repo: Path, model: str) -> tuple[ModelSlot, ReloadResult, CollectorRegistry]:
    registry = CollectorRegistry()
    slot = ModelSlot(model, repo, metrics=WorkerMetrics(registry))
    return slot, await slot.refresh(), registry


@pytest.mark.parametrize(
    ("policy", "broken", "serves"),
    [
        ({"latest": 2}, {3}, 2),  # the newest is broken: fall back to the next allowed
        ({"latest": 3}, {3, 2}, 1),
        ({"specific": [1, 3]}, {3}, 1),  # never outside the listed versions (2 is valid, not listed)
        ({"latest": 1}, set(), 3),
    ],
)
async def test_a_starting_worker_serves_the_newest_valid_version_the_policy_allows(
    tmp_path: Path, policy: dict[str, Any], broken: set[int], serves: int
) -> None:
    repo, model = policy_repo(tmp_path, policy, broken)
    slot, result, registry = await start(repo, model)
    try:
        assert (result.status, result.version) == ("loaded", serves)
        assert sorted(result.refused) == sorted(broken)
        assert all("checksum mismatch" in reason for reason in result.refused.values())
        described = slot.describe()
        assert described["version"] == serves
        assert set(described.get("refused", {})) == {str(v) for v in broken}
        for number in broken:
            labels = {"model": model, "version": str(number), "status": "refused"}
            assert registry.get_sample_value("jetinfer_reloads_total", labels) == 1
    finally:
        slot.close()


async def test_when_every_allowed_version_is_broken_a_starting_worker_says_so_and_serves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo, model = policy_repo(tmp_path, {"latest": 1}, broken={3})
    caplog.set_level(logging.WARNING, logger="jetinfer.worker.reload")
    slot, result, registry = await start(repo, model)
    assert (result.status, result.version, slot.ready) == ("refused", 0, False)
    assert result.message.startswith(
        'no valid version among [3] (allowed by version_policy {"latest": 1}): v3:'
    )
    assert "checksum mismatch" in result.message
    assert "nothing is served until a valid version arrives" in result.message
    assert "older versions [1, 2] are outside the policy" in result.message
    assert slot.describe() == {
        "loaded": False,
        "problem": result.message,
        "refused": {"3": result.refused[3]},
    }
    said = [
        r for r in caplog.records if r.levelno == logging.ERROR and "no valid version among" in r.getMessage()
    ]
    assert len(said) == 1
    # Polling again says nothing new: no second log line, no second count.
    again = await slot.refresh()
    assert again.message == result.message
    assert len([r for r in caplog.records if "no valid version among" in r.getMessage()]) == 1
    labels = {"model": model, "version": "3", "status": "refused"}
    assert registry.get_sample_value("jetinfer_reloads_total", labels) == 1
    # A valid newer version arrives: it serves.
    write_version(repo, ModelRepository(repo).config(model), repo / model / "1" / "model.onnx", version=4)
    loaded = await slot.refresh()
    assert (loaded.status, loaded.version, slot.ready) == ("loaded", 4, True)
    assert "problem" not in slot.describe()
    slot.close()


async def test_a_starting_worker_with_every_version_broken_serves_nothing(tmp_path: Path) -> None:
    repo, model = policy_repo(tmp_path, {"latest": 3}, broken={1, 2, 3})
    slot, result, _ = await start(repo, model)
    assert (result.status, slot.ready) == ("refused", False)
    assert result.message.startswith("no valid version among [3, 2, 1]")
    assert "outside the policy" not in result.message  # nothing older to point at
    assert sorted(result.refused) == [1, 2, 3]
