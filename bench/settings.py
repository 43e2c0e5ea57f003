"""Settings of `jetinfer bench` and `jetinfer engine-bench`: options as flags and `JETINFER_*` variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jetinfer.errors import SettingsError
from jetinfer.settings import ConnectionSettings, require, setting

__all__ = ["PAYLOADS", "BenchSettings", "EngineBenchSettings", "parse_cpus"]

PAYLOADS = ("jpeg", "tensor")


def parse_cpus(text: str) -> set[int]:
    """`0-3,8` -> {0, 1, 2, 3, 8} (taskset's list form). Raises ValueError naming the bad part."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or range such as 0-11")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


@dataclass(kw_only=True)
class BenchSettings(ConnectionSettings):
    """What `jetinfer bench` can be told (the NATS connection of a running worker comes from
    ConnectionSettings; with `embedded` the bench starts its own)."""

    # target
    metrics_url: str | None = setting(None, "a running worker's /metrics, for the batch sizes it formed")
    embedded: bool = setting(False, "start a nats-server and the worker here, as subprocesses")
    workers: int = setting(1, "with --embedded: worker processes sharing the consumer (and the GPU)")
    devices: str | None = setting(
        None, "with --embedded: GPU indices for the workers, e.g. 0,1 (worker i gets devices[i % n])"
    )
    repository: Path | None = setting(
        None, "model repository (with --embedded)", default_text="the demo cache with --embedded"
    )
    model: str = setting("efficientnet_lite0", "model to load")
    worker_log_level: str = setting(
        "WARNING", "with --embedded: the workers' log level (INFO shows what each chose at start)"
    )
    worker_cpus: str | None = setting(
        None,
        "with --embedded: the CPUs the workers may use, e.g. 0-11 (as a pod's CPU limit gives them); "
        "nats-server and the load run on the others",
        default_text="all, shared with the load",
    )
    worker_arg: list[str] = setting(
        [],
        "extra `jetinfer serve` argument for the embedded worker, e.g. --worker-arg=--max-wait-ms=2 "
        "(the variable holds them as shell words)",
        separator=None,
    )
    # load
    concurrency: list[int] = setting([32], "closed loop: requests in flight; several values sweep")
    rate: list[float] = setting(
        [], "open loop: requests per second (instead of --concurrency); several values sweep"
    )
    duration_s: float = setting(10.0, "seconds per load level")
    clients: int = setting(
        1,
        "load-generating processes sharing the concurrency or rate (one Python process tops out at a few "
        "thousand requests/s)",
    )
    warmup_s: float = setting(2.0, "seconds of warm-up before measuring")
    rounds: int = setting(
        1,
        "repeat the worker, --bare and --engine-only measurements this many times, alternating, and report "
        "each round's ratios and their median (shared machines drift between measurements)",
    )
    timeout_s: float = setting(30.0, "seconds to wait for each reply")
    max_error_ratio: float = setting(
        0.01,
        "exit 1 when more than this share of a load level's requests failed (every one failing always "
        "exits 1)",
    )
    # payload
    payload: str = setting("jpeg", f"what each request carries: {' or '.join(PAYLOADS)}")
    image: Path | None = setting(None, "JPEG to send", default_text="the cat photo")
    image_size: int = setting(224, "resize the default photo to this square")
    frames: int = setting(1, "frames per message (jpeg: that many JPEGs in one message, a BYTES input)")
    shape: str | None = setting(
        None,
        "tensor payloads: per-frame shape, e.g. 3,224,224",
        default_text="the model's, from --repository",
    )
    input_name: str = setting("input", "tensor payloads: input name")
    # baselines
    engine_only: bool = setting(False, "also time the model called directly")
    engine_batch: list[int] = setting(
        [], "batch sizes for --engine-only", default_text="1 and the model's max_batch"
    )
    bare: bool = setting(
        False,
        "with --embedded: also run the bare fetch/ack/reply loop in place of the worker (as many as "
        "--workers; with --backlog, draining the same backlog after the workers)",
    )
    backlog: int = setting(
        0,
        "with --embedded: store this many requests in the stream before the workers start, then time "
        "them answering (from the reply that makes 10% to the last): the workers alone, no load "
        "generator in the loop, as for a batch job that pushes every frame first (0: the load levels)",
    )
    # output
    json: Path | None = setting(None, "write the report as JSON here ('-' for stdout)")
    plot: Path | None = setting(None, "write latency against throughput as a PNG")
    progress: bool = setting(True, "a progress bar on stderr (drawn only on a terminal)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.workers >= 1, "workers", "must be at least 1")
        require(bool(self.concurrency), "concurrency", "give at least one level")
        require(all(c >= 1 for c in self.concurrency), "concurrency", "must be at least 1")
        require(all(r > 0 for r in self.rate), "rate", "must be above 0")
        require(self.duration_s > 0, "duration_s", "must be above 0")
        require(self.clients >= 1, "clients", "must be at least 1")
        require(self.warmup_s >= 0, "warmup_s", "must not be negative")
        require(self.rounds >= 1, "rounds", "must be at least 1")
        require(self.timeout_s > 0, "timeout_s", "must be above 0")
        require(0 <= self.max_error_ratio <= 1, "max_error_ratio", "must be 0..1")
        require(self.payload in PAYLOADS, "payload", f"must be {' or '.join(PAYLOADS)}, not {self.payload!r}")
        require(self.image is None or self.image.is_file(), "image", f"no such file: {self.image}")
        require(self.image_size >= 1, "image_size", "must be at least 1")
        require(self.frames >= 1, "frames", "must be at least 1")
        require(all(b >= 1 for b in self.engine_batch), "engine_batch", "must be at least 1")
        require(not self.bare or self.embedded, "bare", "the bare loop baseline needs --embedded")
        require(self.backlog == 0 or self.backlog >= 10, "backlog", "must be 0 or at least 10 requests")
        require(not self.backlog or self.embedded, "backlog", "a backlog needs --embedded")
        if self.shape is not None:
            parts = self.shape.split(",")
            require(
                all(p.strip().isdigit() and int(p) > 0 for p in parts),
                "shape",
                f"{self.shape!r} must be positive integers separated by commas, e.g. 3,224,224",
            )
        levels = ("DEBUG", "INFO", "WARNING", "ERROR")
        require(self.worker_log_level in levels, "worker_log_level", f"must be one of {', '.join(levels)}")
        if self.worker_cpus is not None:
            require(self.embedded, "worker_cpus", "pinning the workers needs --embedded")
            try:
                cpus = parse_cpus(self.worker_cpus)
            except ValueError as exc:
                raise SettingsError("worker_cpus", str(exc)) from None
            rest = set(os.sched_getaffinity(0)) - cpus
            require(
                bool(cpus) and bool(rest), "worker_cpus", "leave the load at least one CPU of this machine's"
            )
        if self.devices is not None:
            require(
                all(p.strip().isdigit() for p in self.devices.split(",")),
                "devices",
                f"{self.devices!r} must be GPU indices separated by commas, e.g. 0,1",
            )

    @property
    def levels(self) -> list[float]:
        """The load levels: rates (open loop) or concurrencies (closed loop)."""
        return [float(r) for r in self.rate] if self.rate else [float(c) for c in self.concurrency]


@dataclass(kw_only=True)
class EngineBenchSettings:
    """What `jetinfer engine-bench` can be told."""

    repository: Path | None = setting(None, "model repository folder (required)")
    model: str | None = setting(None, "model name (required)")
    batch: list[int] = setting([], "batch sizes to time", default_text="1 and the model's max_batch")
    duration_s: float = setting(5.0, "seconds to time each batch size")
    device: int | None = setting(None, "GPU index for GPU backends", default_text="the first GPU")
    parallel_batches: int = setting(
        0, "batches run at once where the backend can, as the worker's setting (0: the backend's choice)"
    )
    json: bool = setting(False, "print JSON (one list) instead of a table")

    def __post_init__(self) -> None:
        require(self.repository is not None, "repository", "give the model repository folder")
        assert self.repository is not None
        require(self.repository.is_dir(), "repository", f"{self.repository} is not a folder")
        require(bool(self.model), "model", "give the model to time")
        require(all(b >= 1 for b in self.batch), "batch", "must be at least 1")
        require(self.duration_s > 0, "duration_s", "must be above 0")
        require(self.device is None or self.device >= 0, "device", "must be a GPU index >= 0")
        require(0 <= self.parallel_batches <= 16, "parallel_batches", "must be 0..16")
