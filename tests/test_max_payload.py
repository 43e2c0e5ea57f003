"""nats-server's max_payload below the streams' max_msg_size: a warning at start, and a client error that
names max_payload and the fix (issue 16.4)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer.embedded import EmbeddedNatsServer
from jetinfer.errors import TooLargeError
from jetinfer.producer.client import Client
from tests.conftest import run_cli, running_worker

ONE_MB = 1024 * 1024


@pytest.fixture
def small_nats() -> Iterator[EmbeddedNatsServer]:
    """A nats-server with its own default max_payload of 1 MB (what `nats-server -js` runs with)."""
    with EmbeddedNatsServer(max_payload_bytes=ONE_MB) as server:
        yield server


def two_fp32_frames() -> np.ndarray[Any, Any]:
    return np.zeros((2, 3, 224, 224), np.float32)  # 1.2 MB


async def test_worker_warns_at_start_and_a_too_large_request_names_max_payload(
    small_nats: EmbeddedNatsServer, model_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    repo, model = model_repo("identity")
    caplog.set_level(logging.WARNING)
    async with running_worker(small_nats.url, repo, [model]), Client(small_nats.url) as client:
        warnings = [r.getMessage() for r in caplog.records if "max_payload" in r.getMessage()]
        assert len(warnings) == 1, caplog.text
        assert str(ONE_MB) in warnings[0]
        assert "--max-msg-size-bytes" in warnings[0]
        assert "JETINFER_MAX_MSG_SIZE_BYTES" in warnings[0]
        assert "max_payload: 8MB" in warnings[0]  # the fix, in the server's own configuration syntax
        with pytest.raises(TooLargeError) as refused:
            await client.infer(model, two_fp32_frames(), timeout=10)
        assert "max_payload" in str(refused.value)
        assert str(ONE_MB) in str(refused.value)
        assert "raise max_payload" in str(refused.value)  # the fix
        assert client.nc.is_connected  # refused before sending: the server never saw it


async def test_no_warning_when_the_server_takes_the_streams_messages(
    own_nats: EmbeddedNatsServer, model_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    repo, model = model_repo("identity")
    caplog.set_level(logging.WARNING)
    async with running_worker(own_nats.url, repo, [model]):
        assert "max_payload" not in caplog.text


def test_infer_cli_names_max_payload(small_nats: EmbeddedNatsServer, tmp_path: Path) -> None:
    tensor = tmp_path / "frames.npy"
    np.save(tensor, two_fp32_frames())
    result = run_cli("infer", "--nats-url", small_nats.url, "identity", str(tensor), timeout=60)
    assert result.returncode == 1
    assert f"jetinfer infer: {tensor}: error too_large: " in result.stderr
    assert "raise max_payload" in result.stderr
    assert "Traceback" not in result.stderr
