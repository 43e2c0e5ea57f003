"""The `jetinfer` command: help for every option, one-line errors naming the fix, real runs."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NatsUnderTest, read_log_until, run_cli, spawn_cli

COMMANDS = ["serve", "infer", "demo", "export-demo", "build", "models", "sidecar"]


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: jetinfer" in result.stdout


def test_bad_setting_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    result = run_cli("serve", "--repository", str(tmp_path), "--max-batch", "many")
    assert result.returncode == 2
    assert "max_batch" in result.stderr
    assert "--max-batch" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_nats_names_the_fix(tmp_path: Path, demo_repository: Path) -> None:
    result = run_cli(
        "serve",
        "--repository",
        str(demo_repository),
        "--model",
        "identity",
        "--nats-url",
        "nats://127.0.0.1:9",
        "--nats-connect-timeout-s",
        "1",
        "--metrics-port",
        "0",
    )
    assert result.returncode == 2
    assert "cannot connect to NATS" in result.stderr
    assert "--nats-url" in result.stderr
    assert "Traceback" not in result.stderr


def test_infer_missing_file_is_a_clear_error() -> None:
    result = run_cli("infer", "--nats-url", "nats://127.0.0.1:9", "resnet50", "/nonexistent.jpg")
    assert result.returncode == 2
    assert "no such file" in result.stderr


def test_serve_then_infer_prints_a_cat_then_sigterm_exits_zero(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes, tmp_path: Path
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(cat_jpeg)
    worker = spawn_cli(
        "serve",
        "--metrics-port",
        "0",
        env={
            "JETINFER_NATS_URL": nats_server.url,
            "JETINFER_REPOSITORY": str(repo),
            "JETINFER_MODEL": model,
        },
    )
    try:
        read_log_until(worker, "serving from consumer")
        result = run_cli("infer", "--nats-url", nats_server.url, model, str(photo))
        assert result.returncode == 0, result.stderr
        assert "cat" in result.stdout.lower()
        assert f"model {model} v1" in result.stdout
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        assert worker.stderr is not None
        worker.stderr.close()
