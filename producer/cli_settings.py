"""Settings of `jetinfer infer` and `jetinfer video`: every option a flag and a `JETINFER_*` variable.

The connection and reply timeout come from `ProducerSettings`; the files and the video input stay
positional arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jetinfer.settings import require, setting

from .settings import ProducerSettings

__all__ = ["InferSettings", "VideoSettings"]


@dataclass(kw_only=True)
class InferSettings(ProducerSettings):
    """What `jetinfer infer` can be told besides its model and files."""

    top_k: int = setting(5, "labels to print per image (classifier outputs)")
    input_name: str = setting("input", "input tensor name for .npy files")
    labels: Path | None = setting(
        None, "label file, one per line", default_text="ImageNet labels for 1000-class outputs"
    )
    out_dir: Path | None = setting(
        None,
        "write every output as FILE.OUTPUT.npy here",
        default_text="only for non-classifiers, next to the input",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.top_k >= 1, "top_k", "must be at least 1")
        require(bool(self.input_name), "input_name", "give the model's input name")
        require(self.labels is None or self.labels.is_file(), "labels", f"no such file: {self.labels}")


@dataclass(kw_only=True)
class VideoSettings(ProducerSettings):
    """What `jetinfer video` can be told besides its input."""

    timeout_s: float = setting(
        30.0, "end the job when no reply came for this long (re-running the command resumes it)"
    )
    model: str | None = setting(None, "model name, e.g. efficientnet_lite0 (required)")
    out: Path | None = setting(None, "JSON-lines file to write, one line per frame (required)")
    job: str | None = setting(None, "job id", default_text="derived from input, model and sampling")
    every_n: int = setting(1, "keep every n-th frame")
    fps: float | None = setting(None, "keep at most this many frames per second (video files)")
    in_flight: int = setting(64, "frames sent and not yet answered, at most")
    frames_per_message: int = setting(
        8,
        "consecutive frames sent in one message (a BYTES input of encoded images): fewer messages; 8 "
        "measured about 1.4 ms of CPU a frame less than 1 (docs/benchmarks.md)",
    )
    top_k: int = setting(5, "labels per frame for classifier outputs")
    labels: Path | None = setting(
        None, "label file, one per line", default_text="ImageNet labels for 1000-class outputs"
    )
    progress: bool = setting(True, "a progress bar on stderr (drawn only on a terminal)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.model), "model", "give the model to run the frames through")
        require(self.out is not None, "out", "give the JSON-lines file to write the results to")
        require(self.every_n >= 1, "every_n", "must be at least 1")
        require(self.fps is None or self.fps > 0, "fps", "must be above 0")
        require(1 <= self.in_flight <= 100_000, "in_flight", "must be 1..100000")
        require(1 <= self.frames_per_message <= 256, "frames_per_message", "must be 1..256")
        require(self.top_k >= 1, "top_k", "must be at least 1")
        require(self.labels is None or self.labels.is_file(), "labels", f"no such file: {self.labels}")
