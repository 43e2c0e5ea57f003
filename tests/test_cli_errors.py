"""Errors read the same way everywhere: `infer`'s request errors and time-outs, bad files before any round
trip, output cut short by `| head`, and the worker's start line (issue 16.9)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer.embedded import EmbeddedNatsServer, free_port
from jetinfer.errors import EmbeddedServerError, JetinferError
from tests.conftest import (
    REPO_ROOT,
    NatsUnderTest,
    read_log_until,
    run_cli,
    running_worker,
    spawn_cli,
    stop_process,
)


def test_infer_prints_an_error_reply_and_a_timeout_the_same_way(
    nats_server: NatsUnderTest, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 3, 8, 8), np.float32))  # the model takes 3x224x224
    right = tmp_path / "right.npy"
    np.save(right, np.zeros((1, 3, 224, 224), np.float32))

    async def with_worker() -> Any:
        async with running_worker(nats_server.url, repo, [model]):
            return await asyncio.to_thread(run_cli, "infer", "--nats-url", nats_server.url, model, str(wrong))

    refused = asyncio.run(with_worker())  # the worker is gone afterwards; its model stays registered
    timed_out = run_cli("infer", "--nats-url", nats_server.url, "--timeout-s", "1", model, str(right))
    for result, path, code in ((refused, wrong, "invalid_input"), (timed_out, right, "timeout")):
        assert result.returncode == 1, result.stderr
        assert result.stdout == ""
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"jetinfer infer: {path}: error {code}: "), line


def test_infer_refuses_bad_files_before_any_round_trip(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    other = tmp_path / "data.csv"
    other.write_text("1,2,3")
    unreachable = "nats://127.0.0.1:9"  # a round trip would fail with "cannot connect" instead
    for path, reason in ((empty, "empty file"), (text, "not a PNG image"), (other, "send .jpg, .jpeg")):
        result = run_cli("infer", "--nats-url", unreachable, "identity", str(path))
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert str(path) in line
        assert reason in line, line
        assert "cannot connect" not in line


def test_models_json_into_a_closed_pipe_ends_quietly(demo_repository: Path) -> None:
    reader = subprocess.Popen(
        [sys.executable, "-m", "jetinfer.cli", "models", "--repository", str(demo_repository), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert reader.stdout is not None
    reader.stdout.close()  # `| head` that has read enough: the pipe closes before the report is written
    _, stderr = reader.communicate(timeout=120)
    assert b"Broken pipe" not in stderr
    assert b"Traceback" not in stderr
    assert stderr == b""
    assert reader.returncode == 141


def test_the_start_line_says_what_is_served_and_what_is_waited_for(
    nats_server: NatsUnderTest, model_repo: Any, unique: str
) -> None:
    repo, model = model_repo("identity")
    missing = f"missing-{unique}"
    port = free_port()
    env = {"JETINFER_NATS_URL": nats_server.url, "JETINFER_REPOSITORY": str(repo)}
    worker = spawn_cli(
        *("serve", "--model", model, "--model", missing),
        *("--metrics-host", "127.0.0.1", "--metrics-port", str(port)),
        env=env,
    )
    try:
        line = read_log_until(worker, ": worker ")[-1]
        assert f"serving {model} v1" in line
        assert f"waiting for a version of {missing}" in line
        assert f"serving {missing}" not in line
        assert f"metrics on port {port}" in line
    finally:
        stop_process(worker)
    idle = spawn_cli("serve", "--model", missing, "--metrics-port", "0", env=env)
    try:
        line = read_log_until(idle, ": worker ")[-1]
        assert "serving nothing yet" in line
        assert "port None" not in line
        assert "metrics off" in line
    finally:
        stop_process(idle)


def test_an_embedded_server_that_cannot_start_is_a_typed_error_naming_its_log(tmp_path: Path) -> None:
    # An unparsable configuration makes nats-server exit at once.
    server = EmbeddedNatsServer(store_dir=tmp_path / "store", extra_config="this is { not a config")
    try:
        with pytest.raises(EmbeddedServerError) as caught:
            server.start(timeout_s=10)
    finally:
        server.stop()
    assert isinstance(caught.value, JetinferError)  # the CLI prints these as one line
    assert "nats-server exited" in str(caught.value)
    assert str(server.log_file) in str(caught.value)
