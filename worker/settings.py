"""The worker's settings: one object per process, from flags and `JETINFER_*` variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from jetinfer.protocol import MODEL_NAME_PATTERN
from jetinfer.settings import ConnectionSettings, StreamSettings, require, setting

from .backends.base import BackendOptions
from .gc_tuning import DEFAULT_GEN0_THRESHOLD
from .reply_policy import DEFAULT_REPLY_PREFIXES, check_reply_prefix

__all__ = ["BackendSettings", "WorkerSettings"]


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(kw_only=True)
class BackendSettings:
    """How backends load and run a model: `jetinfer serve` and `jetinfer engine-bench` share these."""

    device: int | None = setting(None, "GPU index (default: CUDA_VISIBLE_DEVICES / the first GPU)")
    parallel_batches: int = setting(
        0,
        "batches run at once where the backend can: onnxruntime on the CPU shares the cores among them "
        "(2: more throughput under load, a lone request on half the cores); GPU backends run one at a "
        "time; 0: the backend's choice (1)",
    )
    cuda_graphs: bool = setting(
        True,
        "torch and TensorRT on a GPU: capture a CUDA graph per batch bucket (flat memory, less launch time)",
    )
    torch_fp16: bool = setting(
        True, "torch on a GPU: run floating-point models in fp16 where they run correctly so"
    )
    torch_channels_last: bool = setting(
        True, "torch on a GPU: channels-last memory for 4-D inputs where the model runs correctly so"
    )
    ort_threads: int = setting(
        0, "onnxruntime: intra-op threads per batch (0: all cores, shared among --parallel-batches)"
    )
    ort_spinning: bool = setting(
        False, "onnxruntime: let idle intra-op threads spin (faster alone, slower beside decoding and NATS)"
    )

    def __post_init__(self) -> None:
        require(self.device is None or self.device >= 0, "device", "must be a GPU index >= 0")
        require(0 <= self.parallel_batches <= 16, "parallel_batches", "must be 0..16")
        require(0 <= self.ort_threads <= 1024, "ort_threads", "must be 0..1024")

    def backend_options(self) -> BackendOptions:
        """The options every backend is loaded with."""
        return BackendOptions(
            device=self.device,
            parallel_batches=self.parallel_batches,
            cuda_graphs=self.cuda_graphs,
            fp16=self.torch_fp16,
            channels_last=self.torch_channels_last,
            intra_op_threads=self.ort_threads,
            spinning=self.ort_spinning,
        )


@dataclass(kw_only=True)
class WorkerSettings(BackendSettings, ConnectionSettings, StreamSettings):
    """Everything `jetinfer serve` can be told."""

    repository: Path = setting(Path("/models"), "model repository folder (Triton layout)")
    model: list[str] = setting(
        [], "model to serve; repeat for several (default: every model in the repository)"
    )
    max_batch: int = setting(0, "most frames per batch (0: the model config's max_batch)")
    max_wait_ms: float = setting(
        0.0,
        "after the first request of a batch, wait at most this long for more (0: take what is queued; "
        "under load batches still fill while the engine is busy)",
    )
    pipeline_depth: int | None = setting(
        None,
        "prepared batches waiting for the engine (forming the next overlaps inference; default: 1, or "
        "one per preprocessing lane on a GPU)",
    )
    fetch_batches: int = setting(3, "batches' worth of requests kept requested from the server per model")
    decode_workers: int = setting(
        0, "threads decoding and preprocessing requests (0: one per core this process may use)"
    )
    nak_delays_ms: list[int] = setting(
        [250, 1000, 5000, 15000], "growing redelivery delays after a transient error"
    )
    grace_period_s: float = setting(25.0, "on SIGTERM, time to finish the batches in flight before exiting")
    metrics_host: str = setting("0.0.0.0", "address of the /metrics, /healthz and /readyz server")
    metrics_port: int = setting(8080, "port of /metrics, /healthz and /readyz (0: disabled)")
    gpu_decode: bool | None = setting(
        None,
        "decode, resize and normalise JPEG requests on the GPU (torch with CUDA and torchvision; PNG and "
        "tensor requests stay on the CPU); with decoding processes, only batches of up to 4 JPEGs "
        "(latency at idle) (default: chosen at start: on for an image model on a GPU where torchvision is)",
    )
    gpu_normalise: bool | None = setting(
        None,
        "decode image requests on the CPU into uint8 pixels and normalise them on the GPU (a quarter of "
        "FP32's bytes to copy, and the GPU's time stays with the model; torch with CUDA) (default: chosen "
        "at start: on for an image model on a GPU)",
    )
    decode_processes: int | None = setting(
        None,
        "with --gpu-normalise, decode image requests in this many processes into shared memory (past the "
        "GIL of one process; 0: on the decode threads) (default: chosen at start: the cores this process "
        "may use less 2, for an image model on a GPU)",
    )
    preprocess_lanes: int | None = setting(
        None,
        "batches made on the GPU at once, each with its own CUDA stream and share of the decoding "
        "processes (default: chosen at start: 2 on a GPU)",
    )
    gpu_decode_lanes: int | None = setting(
        None,
        "with decoding processes: lanes that decode whole JPEG batches on the GPU beside the processes' "
        "lanes, for an engine the CPU's decoding cannot keep up with (they take GPU time from the model) "
        "(default: chosen at start, from the engine's and one process's measured images/s)",
    )
    fronts: int | None = setting(
        None,
        "front processes that each pull, prepare and answer requests on a NATS connection of their own and "
        "have this process run their batches (its GIL then feeds the GPU, and more messages a second move "
        "than one event loop does); 0: this process does it all, about 0.5 ms faster at idle (default: "
        "chosen at start: 2 for an image model on a GPU with 8 or more cores, else 0)",
    )
    gil_switch_ms: float | None = setting(
        None,
        "how long a busy thread may hold Python's GIL before another waiting thread gets it (0: Python's "
        "5 ms; default: chosen at start: 1 ms for a model on a GPU, so the threads feeding it get it sooner)",
    )
    gc_threshold: int = setting(
        DEFAULT_GEN0_THRESHOLD,
        "allocations between runs of Python's garbage collector on its youngest generation (Python's own "
        "700), with the objects made at start-up frozen out of its runs (0: Python's defaults, no freeze)",
    )
    event_loop: str = setting(
        "auto", "asyncio event loop: uvloop, asyncio, or auto (uvloop where it is installed)"
    )
    nvimgcodec: bool = setting(
        False,
        "decode JPEGs on the GPU's hardware JPEG engine with nvImageCodec (nvidia-nvimgcodec-cu13; no SM "
        "time taken from the model): the lanes decoding JPEG batches on the GPU, and with --gpu-decode "
        "every JPEG; where it is missing or fails its self-test, torchvision's nvJPEG (off by default: "
        "no faster end to end yet, docs/benchmarks.md)",
    )
    reload_poll_s: float = setting(30.0, "poll the repository for new versions this often (0: signal only)")
    lag_poll_s: float = setting(5.0, "read consumer lag from the server this often (for metrics)")
    heartbeat_s: float = setting(
        2.0, "idle heartbeat of pull requests; a stalled pull is renewed after 3 misses"
    )
    worker_id: str = setting(_default_worker_id(), "this worker's name in replies to control messages")
    reply_prefixes: list[str] = setting(
        list(DEFAULT_REPLY_PREFIXES),
        "subject prefixes replies may go below (clients' inboxes, results for durable job replies); a "
        "tenant's request (infer.<model>.<tenant>) may reply only below <prefix>.<tenant>. Any other "
        "Jetinfer-Reply-To is never published to: invalid_input, DLQ",
    )

    def __post_init__(self) -> None:
        BackendSettings.__post_init__(self)
        ConnectionSettings.__post_init__(self)
        StreamSettings.__post_init__(self)
        require(len(str(self.repository)) > 0, "repository", "give the model repository folder")
        for name in self.model:
            require(
                bool(MODEL_NAME_PATTERN.fullmatch(name)), "model", f"{name!r} must match [a-z0-9_-]{{1,64}}"
            )
        require(0 <= self.max_batch <= 4096, "max_batch", "must be 0..4096")
        require(0 <= self.max_wait_ms <= 10_000, "max_wait_ms", "must be 0..10000")
        require(
            self.pipeline_depth is None or 1 <= self.pipeline_depth <= 16, "pipeline_depth", "must be 1..16"
        )
        require(
            not ((self.gpu_decode or self.gpu_normalise) and self.parallel_batches > 1),
            "parallel_batches",
            "--gpu-decode and --gpu-normalise run one batch at a time on the GPU; leave it at 0 or 1",
        )
        require(
            self.decode_processes is None or 0 <= self.decode_processes <= 256,
            "decode_processes",
            "must be 0..256",
        )
        require(
            not self.decode_processes or self.gpu_normalise is not False,
            "decode_processes",
            "decoding processes feed --gpu-normalise: drop --no-gpu-normalise",
        )
        require(
            self.preprocess_lanes is None or 1 <= self.preprocess_lanes <= 8,
            "preprocess_lanes",
            "must be 1..8",
        )
        require(
            self.gpu_decode_lanes is None or 0 <= self.gpu_decode_lanes <= 8,
            "gpu_decode_lanes",
            "must be 0..8",
        )
        require(self.fronts is None or 0 <= self.fronts <= 16, "fronts", "must be 0..16")
        require(
            self.gil_switch_ms is None or self.gil_switch_ms == 0 or 0.05 <= self.gil_switch_ms <= 100,
            "gil_switch_ms",
            "must be 0 or 0.05..100",
        )
        require(
            self.gc_threshold == 0 or 700 <= self.gc_threshold <= 10_000_000,
            "gc_threshold",
            "must be 0 or 700..10000000",
        )
        require(
            self.event_loop in ("auto", "uvloop", "asyncio"), "event_loop", "must be auto, uvloop or asyncio"
        )
        require(1 <= self.fetch_batches <= 64, "fetch_batches", "must be 1..64")
        require(0 <= self.decode_workers <= 256, "decode_workers", "must be 0..256")
        require(
            bool(self.nak_delays_ms) and all(d >= 0 for d in self.nak_delays_ms),
            "nak_delays_ms",
            "give one or more non-negative delays",
        )
        require(0 < self.grace_period_s <= 3600, "grace_period_s", "must be above 0 and at most 3600")
        require(0 <= self.metrics_port <= 65535, "metrics_port", "must be a TCP port (0 disables)")
        require(self.reload_poll_s >= 0, "reload_poll_s", "must be >= 0")
        require(self.lag_poll_s > 0, "lag_poll_s", "must be above 0")
        require(0.1 <= self.heartbeat_s <= 30, "heartbeat_s", "must be 0.1..30")
        require(bool(self.reply_prefixes), "reply_prefixes", "give one or more prefixes, such as _INBOX")
        for prefix in self.reply_prefixes:
            problem = check_reply_prefix(prefix)
            require(problem is None, "reply_prefixes", problem or "")

    def nak_delay_s(self, deliveries: int) -> float:
        """The redelivery delay after the `deliveries`-th failed delivery."""
        index = min(max(deliveries, 1), len(self.nak_delays_ms)) - 1
        return self.nak_delays_ms[index] / 1000.0
