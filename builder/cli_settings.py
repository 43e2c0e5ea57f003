"""Settings of `jetinfer export-demo`, `build` and `models`: every option a flag and a `JETINFER_*` variable.

(`jetinfer sidecar`'s are `builder.sidecar.SidecarSettings`.) The build's source stays a positional
argument; its options become `builder.build.BuildOptions` once checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jetinfer.settings import require, setting

from .build import BACKENDS

__all__ = ["BuildSettings", "ExportDemoSettings", "ModelsSettings"]


def _require_repository(repository: Path | None) -> None:
    require(repository is not None, "repository", "give the model repository folder")


@dataclass(kw_only=True)
class ExportDemoSettings:
    """What `jetinfer export-demo` can be told."""

    repository: Path | None = setting(None, "model repository folder (required)")
    models: list[str] = setting([], "demo models to export", default_text="every demo model")
    force: bool = setting(False, "export again even if a valid version exists")
    progress: bool = setting(True, "a progress bar on stderr (drawn only on a terminal)")

    def __post_init__(self) -> None:
        _require_repository(self.repository)


@dataclass(kw_only=True)
class BuildSettings:
    """What `jetinfer build` can be told besides its source."""

    repository: Path | None = setting(None, "model repository folder the version is written to (required)")
    name: str | None = setting(
        None, "model name in the repository, [a-z0-9_-]{1,64}", default_text="the demo model's name"
    )
    config: Path | None = setting(
        None,
        "config.json to use (inputs, outputs, max_batch, preprocess, labels)",
        default_text="derived from an ONNX graph's inputs and outputs, with no preprocessing; "
        "required for a .pt2 program",
    )
    backend: str | None = setting(
        None,
        f"backend the version is for: {', '.join(BACKENDS)}",
        default_text="torch for a .pt2 program, else onnxruntime",
    )
    keep: int | None = setting(None, "afterwards keep only the newest K versions", default_text="all")
    version: int | None = setting(
        None, "version number", default_text="one above the newest here and in --serving-repository"
    )
    serving_repository: Path | None = setting(
        None,
        "the repository the workers serve from (the sidecar's --repository), when building into its "
        "source (incoming/) or elsewhere: the version is numbered above its newest, so the sidecar "
        "publishes it",
    )
    fp16: bool = setting(False, "fp16 precision (tensorrt, torch)")
    int8: bool = setting(False, "int8 precision with calibration (tensorrt)")
    calibration_dir: Path | None = setting(
        None, "representative inputs for --int8 calibration (images or .npy batches)"
    )
    min_batch: int = setting(1, "smallest batch of the TensorRT profile")
    opt_batch: int | None = setting(
        None, "batch the TensorRT engine is tuned for", default_text="the max batch"
    )
    max_batch: int | None = setting(
        None,
        "largest batch; overrides the config's max_batch",
        default_text="the config's, or 32 when derived",
    )
    workspace_mb: int = setting(4096, "TensorRT builder workspace in MB")
    timing_cache: Path | None = setting(
        None, "TensorRT timing cache to read and update (faster rebuilds on the same GPU)"
    )

    def __post_init__(self) -> None:
        _require_repository(self.repository)
        require(
            self.backend is None or self.backend in BACKENDS,
            "backend",
            f"{self.backend!r} is not one of {', '.join(BACKENDS)}",
        )


@dataclass(kw_only=True)
class ModelsSettings:
    """What `jetinfer models` can be told."""

    repository: Path | None = setting(None, "model repository folder (required)")
    json: bool = setting(False, "print the report as JSON")
    verify: bool = setting(True, "check each model file's sha256 (--no-verify: faster on big engines)")

    def __post_init__(self) -> None:
        _require_repository(self.repository)
