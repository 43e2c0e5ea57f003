"""A second worker on the same host: the metrics port in use is one line naming the setting (issue 16.3)."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.conftest import run_cli


def test_metrics_port_in_use_is_one_line_naming_the_flag_and_the_variable(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            "--repository",
            str(tmp_path),
            "--model",
            "identity",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(port),
            "--nats-url",
            "nats://127.0.0.1:9",
            "--nats-connect-timeout-s",
            "1",
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    assert "--metrics-port" in lines[0]
    assert "JETINFER_METRICS_PORT" in lines[0]
    assert str(port) in lines[0]
    assert "in use" in lines[0]
