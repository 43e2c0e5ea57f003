"""Fault injection for the reliability tests: a real backend with faults, worker processes, request tallies.

`FaultyBackend` is the ONNX Runtime backend with faults; `faulty(**faults)` is the backend factory a
worker is given through its constructor (`running_worker(..., backend_factory=faulty(...))`, or, in a
worker process, `python -m tests.faults --faults JSON serve ...`):

- `sleep_s`: each batch sleeps this long before running (a backend slower than ack_wait)
- `poison`: a frame whose first value equals this fails with a BackendError, every time
- `crash_on_poison`: instead of failing, the process dies at once (SIGKILL), as a segfault would

Every frame whose first value is a positive marker is counted in `EXECUTIONS` (in-process workers),
so a test can tell how many times each request ran.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jetinfer.errors import BackendError, RequestTimeoutError
from jetinfer.repository import ModelVersion
from jetinfer.worker.backends.base import Backend, BackendFactory, BackendOptions, load_backend
from jetinfer.worker.backends.onnxruntime import OnnxRuntimeBackend

REPO_ROOT = Path(__file__).resolve().parents[1]

#: marker (first value of a frame) -> times a batch holding it ran (in this process).
EXECUTIONS: collections.Counter[int] = collections.Counter()
_LOCK = threading.Lock()


class FaultyBackend(OnnxRuntimeBackend):
    """ONNX Runtime with `faults` (a dict, which the test may change while the worker runs)."""

    name = "onnxruntime"

    def __init__(self, version: ModelVersion, options: BackendOptions | None, faults: dict[str, Any]) -> None:
        super().__init__(version, options)
        self.faults = faults

    def infer(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        config = self.faults
        first = next(iter(inputs.values()))
        markers = [float(frame.reshape(-1)[0]) for frame in first] if first.size else []
        poison = config.get("poison")
        if poison is not None and poison in markers:
            if config.get("crash_on_poison"):
                os.kill(os.getpid(), signal.SIGKILL)
            raise BackendError(f"poison request {poison} fails every time")
        if config.get("sleep_s") and any(m > 0 for m in markers):
            time.sleep(float(config["sleep_s"]))
        with _LOCK:
            EXECUTIONS.update(int(m) for m in markers if m > 0)
        return super().infer(inputs)


def faulty(**faults: Any) -> BackendFactory:
    """A backend factory that serves onnxruntime versions through FaultyBackend with `faults` (counting
    every execution in `EXECUTIONS`, which it clears) and loads every other version as usual."""
    EXECUTIONS.clear()

    def load(version: ModelVersion, options: BackendOptions) -> Backend:
        if version.backend == "onnxruntime":
            return FaultyBackend(version, options, faults)
        return load_backend(version, options)

    return load


def frames(marker: int, width: int = 4) -> npt.NDArray[np.float32]:
    """One request's input for the identity model: a frame full of `marker`."""
    return np.full((1, width), float(marker), np.float32)


# -- worker processes ------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """`jetinfer serve` in a child process (with FaultyBackend when faults are given)."""

    url: str
    repository: Path
    model: str
    log_file: Path
    settings: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] | None = None
    process: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        """The command line."""
        if self.faults is not None:
            args = [sys.executable, "-m", "tests.faults", "--faults", json.dumps(self.faults)]
        else:
            args = [sys.executable, "-m", "jetinfer.cli"]
        args += ["serve", "--nats-url", self.url]
        args += ["--repository", str(self.repository), "--model", self.model, "--metrics-port", "0"]
        args += ["--reload-poll-s", "0", "--decode-workers", "1"]
        for name, value in self.settings.items():
            values = value if isinstance(value, list) else [value]
            for item in values:
                args += ["--" + name.replace("_", "-"), str(item)]
        return args

    def start(self) -> WorkerProcess:
        """Start the worker; `ready()` tells when it serves."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self.args(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
            )
        return self

    def log(self) -> str:
        """What the worker printed so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    async def ready(self, timeout_s: float = 60.0) -> None:
        """Wait until the worker logs that it serves (it then pulls requests)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while "serving" not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not serving after {timeout_s} s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)

    async def front_pids(self, timeout_s: float = 60.0) -> list[int]:
        """The pids of the worker's front processes (`--fronts`), once it says it has started them."""
        pattern = re.compile(r"front processes \(pids ([\d, ]+)\)")
        deadline = time.monotonic() + timeout_s
        while (found := pattern.search(self.log())) is None:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker named no fronts after {timeout_s} s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        return [int(pid) for pid in found.group(1).split(", ")]

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self) -> None:
        """SIGTERM: the graceful stop Kubernetes asks for."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float) -> int:
        """The exit code, waiting at most `timeout_s`."""
        assert self.process is not None
        return await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout_s)

    def close(self) -> None:
        """Kill the process if it still runs. Safe to call twice."""
        self.kill()


def exited(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie nobody reaped yet counts)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def worker_processes(*workers: WorkerProcess) -> Any:
    """Kill every worker process on the way out, whatever happened."""
    try:
        yield workers
    finally:
        for worker in workers:
            worker.close()


# -- counting requests -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What became of every request of a load: answered, errors, lost (no answer), duplicates."""

    sent: int
    answered: int
    errors: dict[str, int]
    lost: list[int]
    wrong: list[int]
    duplicates: int
    recover_s: float | None = None

    def line(self, fault: str) -> str:
        """One line for the test output (`-s` or the report)."""
        recover = f"{self.recover_s:.1f} s" if self.recover_s is not None else "-"
        return (
            f"[delivery] {fault}: sent={self.sent} answered={self.answered} errors={dict(self.errors)} "
            f"lost={len(self.lost)} duplicates={self.duplicates} recover={recover}"
        )


def tally(markers: Sequence[int], results: Sequence[Any], duplicates: int) -> Tally:
    """Count `results` (InferResponse or exception, one per marker) of identity-model requests."""
    answered, errors, lost, wrong = 0, collections.Counter[str](), [], []
    for marker, result in zip(markers, results, strict=True):
        if isinstance(result, RequestTimeoutError):
            lost.append(marker)
        elif isinstance(result, BaseException):
            errors[getattr(result, "code", type(result).__name__)] += 1
        elif not np.array_equal(result.output(), frames(marker)):
            wrong.append(marker)
        else:
            answered += 1
    return Tally(len(markers), answered, dict(errors), lost, wrong, duplicates)


def main() -> int:
    """`python -m tests.faults --faults JSON serve ARGS`: `jetinfer serve ARGS` given `faulty(**JSON)`."""
    import logging

    from jetinfer.cli import build_parser
    from jetinfer.settings import load_settings
    from jetinfer.worker.cli import run_worker
    from jetinfer.worker.settings import WorkerSettings

    if sys.argv[1:2] != ["--faults"]:
        raise SystemExit("usage: python -m tests.faults --faults JSON serve ARGS")
    config = json.loads(sys.argv[2])
    args = build_parser().parse_args(sys.argv[3:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(load_settings(WorkerSettings, args), backend_factory=faulty(**config))


if __name__ == "__main__":
    sys.exit(main())
