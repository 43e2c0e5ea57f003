"""`jetinfer build`: turn an ONNX file, a torch.export program or a demo model into a new repository
version for a backend.

=============  ====================================================================================
backend        what happens
=============  ====================================================================================
onnxruntime    the ONNX file is checked (onnxruntime loads it, its inputs/outputs match the config,
               a batch of zeros runs) and copied as model.onnx
tensorrt       `builder.tensorrt_engine.build_engine` builds model.plan from the ONNX file
torch          a user's torch.export program (.pt2, with a config) is checked by
               `builder.torch_export.check_pt2` (it loads, takes the config's inputs with a batch of
               1..max_batch, and batches of 1 and 2 run on the CPU with the configured outputs) and
               copied as model.pt2; a demo model's torch module is exported by `export_pt2`
=============  ====================================================================================

The GPU backends are imported lazily: where they or TensorRT/CUDA are missing, the build fails with
`MissingDependencyError` naming what is missing. Every build ends in `write_version` (hidden temporary
folder, fsync, rename), so a failed build leaves no numeric version folder behind; `keep` then prunes
the older versions.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from jetinfer.errors import JetinferError, RepositoryError
from jetinfer.repository import ModelConfig, ModelRepository, ModelVersion, prune_versions, write_version

from .demo_models import DEMO_MODELS, MissingDependencyError
from .export import export_onnx, producer_versions
from .onnx_tools import (
    check_signature,
    config_from_signature,
    open_session,
    read_signature,
    smoke_run,
)

__all__ = [
    "BACKENDS",
    "BuildOptions",
    "BuildResult",
    "build",
    "load_config_file",
    "version_number",
]

logger = logging.getLogger(__name__)

BACKENDS: Final = ("onnxruntime", "tensorrt", "torch")


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """How to build: backend, precision, batch profile and how many versions to keep."""

    backend: str = "onnxruntime"
    keep: int | None = None
    fp16: bool = False
    int8: bool = False
    calibration_dir: Path | None = None
    min_batch: int = 1
    opt_batch: int | None = None
    max_batch: int | None = None
    workspace_mb: int = 4096
    timing_cache: Path | None = None
    version: int | None = None
    serving_repository: Path | None = None

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise RepositoryError("build options", message)

        need(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        need(self.keep is None or self.keep >= 1, "--keep must be at least 1")
        need(
            not (self.fp16 or self.int8) or self.backend != "onnxruntime",
            "--fp16 and --int8 need --backend tensorrt (or --fp16 with --backend torch); "
            "onnxruntime serves the ONNX file as it is",
        )
        need(not self.int8 or self.backend == "tensorrt", "--int8 needs --backend tensorrt")
        need(
            not self.int8 or self.calibration_dir is not None,
            "--int8 needs --calibration-dir (a folder of representative input images or .npy batches)",
        )
        need(
            self.calibration_dir is None or self.calibration_dir.is_dir(),
            f"--calibration-dir {self.calibration_dir} is not a folder",
        )
        need(self.min_batch >= 1, "--min-batch must be at least 1")
        need(self.max_batch is None or self.max_batch >= self.min_batch, "--max-batch must be ≥ --min-batch")
        need(self.opt_batch is None or self.opt_batch >= self.min_batch, "--opt-batch must be ≥ --min-batch")
        need(
            self.opt_batch is None or self.max_batch is None or self.opt_batch <= self.max_batch,
            "--opt-batch must be ≤ --max-batch",
        )
        need(self.workspace_mb >= 1, "--workspace-mb must be at least 1")
        need(
            self.serving_repository is None or self.serving_repository.is_dir(),
            f"--serving-repository {self.serving_repository} is not a folder",
        )

    @property
    def precision(self) -> str:
        """The manifest's precision: int8, fp16 or fp32."""
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"


def version_number(repository: Path, name: str, options: BuildOptions) -> int | None:
    """The number the build writes: `--version`, else one above the newest of `repository` and of the
    serving repository (`--serving-repository`: the sidecar takes only versions newer than its newest).

    None leaves the choice to `write_version` (one above `repository`'s newest). Raises RepositoryError
    for a `--version` the serving repository already has, or has something newer than.
    """
    if options.serving_repository is None:
        return options.version
    serving = max(ModelRepository(options.serving_repository).versions(name), default=0)
    if options.version is not None:
        if options.version <= serving:
            raise RepositoryError(
                options.serving_repository / name,
                f"--version {options.version} is not newer than the serving repository's newest "
                f"(v{serving}): the sidecar would never publish it; give --version {serving + 1} or more, "
                "or leave --version out",
            )
        return options.version
    return max(serving, *ModelRepository(repository).versions(name), 0) + 1


@dataclass(frozen=True)
class BuildResult:
    """The version a build wrote, and the versions `keep` removed."""

    version: ModelVersion
    removed: tuple[int, ...]
    size_bytes: int


def load_config_file(path: Path, name: str) -> ModelConfig:
    """Read a config.json (format of the repository's), with labels from a file beside it if named.

    A config without ``name`` takes `name`; a config naming another model is refused.
    """
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise RepositoryError(path, "no such config file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(path, f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RepositoryError(path, "config must be a JSON object")
    obj.setdefault("name", name)
    if obj["name"] != name:
        raise RepositoryError(path, f"config names model {obj['name']!r}, but --name is {name!r}")
    labels: list[str] = []
    label_file = obj.get("labels")
    if label_file:
        if not isinstance(label_file, str):
            raise RepositoryError(path, "labels must name a file beside the config (one label per line)")
        try:
            labels = (path.parent / label_file).read_text().splitlines()
        except OSError as exc:
            raise RepositoryError(path.parent / label_file, f"cannot read labels: {exc}") from None
    return ModelConfig.from_dict(obj, where=path, labels=labels)


def _missing(backend: str, exc: ImportError, hint: str) -> MissingDependencyError:
    name = exc.name or str(exc)
    what = (
        f"module {name}, which this installation lacks"
        if name.startswith(f"{__package__}.")
        else f"package {name!r}, which is not installed here"
    )
    return MissingDependencyError(f"--backend {backend} needs {what}; {hint}")


_TENSORRT_HINT: Final = "TensorRT engines are built where tensorrt and a CUDA GPU are present (the GPU image)"
_TORCH_HINT: Final = "model.pt2 is built where torch is installed (the export extra; a CUDA GPU to serve it)"


def _load_tensorrt_backend() -> Any:
    try:
        return importlib.import_module(".tensorrt_engine", __package__).build_engine
    except ImportError as exc:
        raise _missing("tensorrt", exc, _TENSORRT_HINT) from exc


def _load_torch_backend(function: str = "export_pt2") -> Any:
    try:
        return getattr(importlib.import_module(".torch_export", __package__), function)
    except ImportError as exc:
        raise _missing("torch", exc, _TORCH_HINT) from exc


def _call_backend(backend: str, target: Path, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a GPU backend's build function, turning its failures into one-line errors."""
    try:
        return fn(*args, **kwargs)
    except (JetinferError, MissingDependencyError):
        raise
    except ImportError as exc:
        raise _missing(backend, exc, _TENSORRT_HINT if backend == "tensorrt" else _TORCH_HINT) from exc
    except Exception as exc:  # CUDA/TensorRT/torch raise many types; the build failed either way
        logger.debug("build: %s backend failed", backend, exc_info=True)
        raise RepositoryError(target, f"{backend} build failed: {type(exc).__name__}: {exc}") from exc


def _resolve_config(
    source_config: ModelConfig | None, config: ModelConfig | None, name: str, options: BuildOptions
) -> ModelConfig | None:
    chosen = config or (dataclasses.replace(source_config, name=name) if source_config else None)
    if chosen is not None and options.max_batch is not None:
        chosen = dataclasses.replace(chosen, max_batch=options.max_batch)
    return chosen


def _check_onnx(onnx_file: Path, config: ModelConfig | None, name: str, options: BuildOptions) -> ModelConfig:
    """Open the ONNX file with onnxruntime, derive or check the config, run a batch of zeros."""
    session = open_session(onnx_file)
    signature = read_signature(session, onnx_file)
    if config is None:
        config = config_from_signature(signature, name, max_batch=options.max_batch)
        logger.info("build: %s: no --config; derived inputs/outputs from the graph", name)
    check_signature(signature, config, onnx_file)
    smoke_run(session, config, onnx_file, batch=min(2, config.max_batch))
    return config


def build(
    source: Path | str,
    repository: Path | str,
    name: str,
    *,
    config: ModelConfig | None = None,
    options: BuildOptions | None = None,
) -> BuildResult:
    """Build `source` (an ONNX file, or the name of a demo model) into a new version of `name`.

    Returns the written version; raises RepositoryError (bad input, failed check),
    MissingDependencyError (a backend's packages are missing) or the backend's own error.
    """
    options = options or BuildOptions()
    repository = Path(repository)
    source_text = str(source)
    demo = DEMO_MODELS.get(source_text) if not Path(source_text).exists() else None
    onnx_file = None if demo is not None else Path(source_text)
    if onnx_file is not None and not onnx_file.is_file():
        raise RepositoryError(
            onnx_file,
            "no such file: give an ONNX file, a .pt2 program or a demo model name "
            f"({', '.join(DEMO_MODELS)})",
        )
    program = onnx_file if onnx_file is not None and onnx_file.suffix == ".pt2" else None
    if program is not None and options.backend != "torch":
        raise RepositoryError(
            program, "a .pt2 program is served by the torch backend: give --backend torch (or no --backend)"
        )
    if onnx_file is not None and program is None and options.backend == "torch":
        raise RepositoryError(
            onnx_file,
            "--backend torch takes a torch.export program (.pt2, from torch.export.save) or a demo model "
            f"name ({', '.join(DEMO_MODELS)}); an ONNX file is for onnxruntime or tensorrt",
        )
    if program is not None and config is None:
        raise RepositoryError(
            program,
            "a .pt2 program needs --config (a config.json with inputs, outputs, max_batch and, for image "
            "requests, preprocess): the program does not say how requests map onto it",
        )
    config = _resolve_config(demo.config() if demo else None, config, name, options)
    with tempfile.TemporaryDirectory(prefix="jetinfer-build-") as tmp:
        workdir = Path(tmp)
        producer: dict[str, str]
        tensorrt: dict[str, str] = {}
        if program is not None:
            assert config is not None
            check_pt2 = _load_torch_backend("check_pt2")
            _call_backend("torch", program, check_pt2, program, config)
            model_file = program
            producer = producer_versions("torch")
        elif options.backend == "torch":
            assert demo is not None
            export_pt2 = _load_torch_backend()
            module, demo_config = demo.module()
            config = config or dataclasses.replace(demo_config, name=name)
            model_file = workdir / "model.pt2"
            _call_backend(
                "torch", model_file, export_pt2, module, model_file, config=config, max_batch=config.max_batch
            )
            producer = producer_versions("torch")
        else:
            if demo is not None:
                onnx_file = workdir / "model.onnx"
                if demo.onnx_writer is not None:
                    demo.onnx_writer(onnx_file)
                else:
                    module, _ = demo.module()
                    assert config is not None
                    export_onnx(module, config, onnx_file)
            assert onnx_file is not None
            config = _check_onnx(onnx_file, config, name, options)
            if options.backend == "onnxruntime":
                model_file = onnx_file
                producer = producer_versions("onnxruntime")
            else:
                build_engine = _load_tensorrt_backend()
                model_file = workdir / "model.plan"
                max_batch = config.max_batch
                if options.min_batch > max_batch or (options.opt_batch or max_batch) > max_batch:
                    raise RepositoryError(
                        onnx_file,
                        f"--min-batch/--opt-batch must not exceed the model's max_batch {max_batch}",
                    )
                tensorrt = dict(
                    _call_backend(
                        "tensorrt",
                        model_file,
                        build_engine,
                        onnx_file,
                        model_file,
                        config=config,
                        fp16=options.fp16,
                        int8=options.int8,
                        calibration_dir=options.calibration_dir,
                        min_batch=options.min_batch,
                        opt_batch=options.opt_batch or max_batch,
                        max_batch=max_batch,
                        workspace_bytes=options.workspace_mb * 1024 * 1024,
                        timing_cache=options.timing_cache,
                    )
                )
                producer = producer_versions("tensorrt")
        if not model_file.is_file():
            raise RepositoryError(model_file, f"the {options.backend} build wrote no model file")
        version = write_version(
            repository,
            config,
            model_file,
            backend=options.backend,
            precision=options.precision,
            producer=producer,
            tensorrt=tensorrt,
            version=version_number(repository, name, options),
        )
    removed = tuple(prune_versions(repository, name, keep=options.keep)) if options.keep else ()
    return BuildResult(version=version, removed=removed, size_bytes=version.model_file.stat().st_size)
