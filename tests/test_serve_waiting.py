"""`serve --model X` before the repository has X: no registration until a version loads (issue 16.2).

Clients get `unknown_model` at once meanwhile instead of requests that wait in the stream; the
worker says what it waits for (and that the repository folder does not exist), and serves as soon
as a version arrives by the reload signal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from jetinfer.errors import UnknownModelError
from jetinfer.producer.client import Client
from jetinfer.streams import INFER_STREAM, reload_subject
from tests.conftest import (
    NatsUnderTest,
    copy_model,
    read_log_until,
    run_cli,
    running_worker,
    spawn_cli,
    stop_process,
)


async def test_a_model_without_a_version_is_not_registered_until_one_loads(
    nats_server: NatsUnderTest,
    demo_repository: Path,
    tmp_path: Path,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = f"later-{unique}"
    repository = tmp_path / "nope"
    caplog.set_level(logging.INFO)
    async with (
        running_worker(nats_server.url, repository, [model]) as worker,
        Client(nats_server.url) as client,
    ):
        assert "does not exist" in caplog.text
        assert str(repository) in caplog.text
        with pytest.raises(UnknownModelError):
            await asyncio.wait_for(client.infer(model, np.ones((1, 4), np.float32), timeout=5), 10)
        info = await client.js.stream_info(INFER_STREAM) if await _infer_exists(client) else None
        assert info is None or f"infer.{model}" not in (info.config.subjects or [])
        copy_model(demo_repository, "identity", repository, model)
        answer = await client.nc.request(reload_subject(model), b"{}", timeout=30)
        assert json.loads(answer.data)["status"] == "loaded"
        reply = await client.infer(model, np.ones((1, 4), np.float32), timeout=10)
        assert reply.output("output").tolist() == [[1.0, 1.0, 1.0, 1.0]]
        assert model in worker.servers


async def _infer_exists(client: Client) -> bool:
    from nats.js.errors import NotFoundError

    try:
        await client.js.stream_info(INFER_STREAM)
    except NotFoundError:
        return False
    return True


def test_serve_of_a_missing_model_says_what_it_waits_for_and_infer_fails_fast(
    nats_server: NatsUnderTest, demo_repository: Path, tmp_path: Path, unique: str
) -> None:
    model = f"waited-{unique}"
    repository = tmp_path / "models"
    tensor = tmp_path / "x.npy"
    np.save(tensor, np.ones((1, 4), np.float32))
    worker = spawn_cli(
        *("serve", "--metrics-port", "0", "--reload-poll-s", "0.5"),
        env={
            "JETINFER_NATS_URL": nats_server.url,
            "JETINFER_REPOSITORY": str(repository),
            "JETINFER_MODEL": model,
        },
    )
    try:
        seen = "".join(read_log_until(worker, "waiting", 60))
        assert "does not exist" in seen, seen
        assert str(repository) in seen, seen
        failed = run_cli(
            "infer", "--nats-url", nats_server.url, "--timeout-s", "5", model, str(tensor), timeout=60
        )
        assert failed.returncode == 1
        assert f"jetinfer infer: {tensor}: error unknown_model: " in failed.stderr
        copy_model(demo_repository, "identity", repository, model)
        read_log_until(worker, "serving from consumer", 60)
        served = run_cli("infer", "--nats-url", nats_server.url, model, str(tensor), timeout=60)
        assert served.returncode == 0, served.stdout + served.stderr
        assert f"model {model} v1" in served.stdout
    finally:
        stop_process(worker)
    shutil.rmtree(repository, ignore_errors=True)
