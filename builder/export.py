"""`jetinfer export-demo`: export the demo models to ONNX and publish them into a model repository.

Each model is exported into a temporary folder, checked (onnxruntime loads it, its signature matches
the config, and its outputs match torch's on a random batch), and only then written as a new version
with `write_version` (atomic). A model whose newest version is already valid is skipped unless
`force` is set. torch is imported here and in `builder.demo_models` only, never by the serving path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

import numpy as np

from jetinfer.errors import RepositoryError
from jetinfer.repository import ModelConfig, ModelRepository, write_version

from .demo_models import DEMO_MODELS, MissingDependencyError
from .models import format_bytes
from .onnx_tools import check_signature, open_session, read_signature, smoke_run

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_DEMO_MODELS",
    "ExportResult",
    "check_against_torch",
    "export_demo",
    "export_onnx",
    "newest_valid_version",
    "producer_versions",
    "summarize",
]

logger = logging.getLogger(__name__)

DEFAULT_DEMO_MODELS: Final = tuple(DEMO_MODELS)
ONNX_OPSET: Final = 17
#: Largest allowed |onnxruntime - torch| relative to the largest |torch output| (and at least 1).
RELATIVE_TOLERANCE: Final = 1e-3


@dataclass(frozen=True)
class ExportResult:
    """What `export_demo` did with one model."""

    name: str
    status: Literal["written", "skipped", "unavailable"]
    message: str
    version: int | None = None
    path: Path | None = None
    size_bytes: int = 0
    max_abs_diff: float | None = None


def producer_versions(*packages: str) -> dict[str, str]:
    """Installed versions of `packages` (and jetinfer), for a manifest's ``producer`` map."""
    versions = {}
    for package in (*packages, "jetinfer"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _example_inputs(config: ModelConfig, batch: int, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in config.inputs:
        shape = (batch, *(256 if d == -1 else d for d in spec.shape))
        arrays[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return arrays


def export_onnx(module: torch.nn.Module, config: ModelConfig, path: Path, *, opset: int = ONNX_OPSET) -> None:
    """Export `module` to ONNX at `path`, with the config's tensor names and a dynamic batch axis.

    The exporter's warnings are suppressed (they are about tracing internals, not the result, which
    `check_against_torch` verifies).
    """
    import torch

    if any(spec.datatype != "FP32" for spec in config.inputs):
        raise RepositoryError(path, "export_onnx handles FP32 inputs only")
    example = tuple(torch.from_numpy(a) for a in _example_inputs(config, 1, seed=0).values())
    dynamic: dict[str, dict[int, str]] = {}
    for spec in (*config.inputs, *config.outputs):
        axes = {0: "batch"}
        axes.update({i + 1: f"{spec.name}_dim{i + 1}" for i, d in enumerate(spec.shape) if d == -1})
        dynamic[spec.name] = axes
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=[spec.name for spec in config.inputs],
            output_names=[spec.name for spec in config.outputs],
            dynamic_axes=dynamic,
            dynamo=False,
            opset_version=opset,
        )
    if printed.getvalue().strip():
        logger.debug("torch.onnx.export: %s", printed.getvalue().strip())


def check_against_torch(
    module: torch.nn.Module | None, onnx_path: Path, config: ModelConfig, *, batch: int = 2, seed: int = 0
) -> float:
    """Load `onnx_path` with onnxruntime, check its signature, and compare it with `module` on a random
    batch (with no module, the graph must return its input: the identity model). Returns the largest
    absolute difference; raises RepositoryError when it is too large.
    """
    session = open_session(onnx_path)
    check_signature(read_signature(session, onnx_path), config, onnx_path)
    smoke_run(session, config, onnx_path, batch=1)
    feed = _example_inputs(config, batch, seed)
    names = [spec.name for spec in config.outputs]
    got = dict(zip(names, session.run(names, feed), strict=True))
    if module is None:
        expected = {names[0]: next(iter(feed.values()))}
    else:
        import torch

        with torch.no_grad():
            result = module(*(torch.from_numpy(a) for a in feed.values()))
        results = result if isinstance(result, tuple | list) else (result,)
        expected = {name: r.detach().cpu().numpy() for name, r in zip(names, results, strict=True)}
    worst = 0.0
    for name, want in expected.items():
        if got[name].shape != want.shape:
            raise RepositoryError(
                onnx_path, f"output {name!r}: onnxruntime shape {got[name].shape}, torch shape {want.shape}"
            )
        diff = float(np.max(np.abs(got[name].astype(np.float64) - want.astype(np.float64))))
        limit = RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(want))))
        if not diff <= limit:
            raise RepositoryError(
                onnx_path, f"output {name!r} differs from torch by {diff:.3g} (allowed {limit:.3g})"
            )
        worst = max(worst, diff)
    return worst


def newest_valid_version(repository: Path, name: str) -> int | None:
    """The newest version of `name` if it loads and verifies, else None."""
    repo = ModelRepository(repository)
    try:
        versions = repo.versions(name)
        if not versions:
            return None
        return repo.load_version(name, versions[-1]).version
    except (RepositoryError, OSError) as exc:
        logger.info("export-demo: %s: newest version is not valid (%s); exporting again", name, exc)
        return None


def _export_one(name: str, repository: Path, workdir: Path, say: Any) -> ExportResult:
    demo = DEMO_MODELS[name]
    target = workdir / f"{name}.onnx"
    started = time.perf_counter()
    module = None
    if demo.onnx_writer is not None:
        say(f"{name}: writing the ONNX graph")
        config = demo.onnx_writer(target)
        producer = producer_versions("onnx", "onnxruntime")
    else:
        say(f"{name}: loading the torch model")
        module, config = demo.module()
        say(f"{name}: exporting to ONNX (opset {ONNX_OPSET})")
        export_onnx(module, config, target)
        producer = producer_versions("torch", "onnx", "onnxruntime")
    diff = check_against_torch(module, target, config)
    checked = "output equals input" if module is None else f"matches torch, max abs diff {diff:.2g}"
    say(f"{name}: onnxruntime check passed ({checked})")
    version = write_version(
        repository, config, target, backend="onnxruntime", precision="fp32", producer=producer
    )
    size = version.model_file.stat().st_size
    return ExportResult(
        name=name,
        status="written",
        message=f"v{version.version} at {version.path} ({format_bytes(size)}, "
        f"{time.perf_counter() - started:.1f} s)",
        version=version.version,
        path=version.path,
        size_bytes=size,
        max_abs_diff=diff,
    )


def export_demo(
    repository: Path | str,
    models: Iterable[str] = DEFAULT_DEMO_MODELS,
    *,
    force: bool = False,
    progress: bool = True,
    out: TextIO | None = None,
) -> list[ExportResult]:
    """Export the named demo models into `repository`; returns one result per model.

    A model that cannot be exported here (torchvision missing for resnet50) is reported as
    ``unavailable`` with the reason; a failing check raises RepositoryError and publishes nothing.
    """
    from tqdm import tqdm

    repository = Path(repository)
    names = list(dict.fromkeys(models))
    unknown = [n for n in names if n not in DEMO_MODELS]
    if unknown:
        raise RepositoryError(", ".join(unknown), f"unknown demo model; choose from {', '.join(DEMO_MODELS)}")
    stream = out if out is not None else sys.stdout
    repository.mkdir(parents=True, exist_ok=True)
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="jetinfer-export-") as tmp,
        tqdm(total=len(names), desc="export-demo", unit="model", disable=None if progress else True) as bar,
    ):

        def say(line: str) -> None:
            bar.write(line, file=stream)

        for name in names:
            bar.set_postfix_str(name)
            existing = None if force else newest_valid_version(repository, name)
            if existing is not None:
                result = ExportResult(
                    name, "skipped", f"v{existing} is valid already (--force exports again)", version=existing
                )
            else:
                try:
                    result = _export_one(name, repository, Path(tmp), say)
                except MissingDependencyError as exc:
                    result = ExportResult(name, "unavailable", str(exc))
            say(f"{name}: {result.status}: {result.message}")
            results.append(result)
            bar.update()
    return results


def summarize(results: Iterable[ExportResult]) -> Mapping[str, int]:
    """How many models were written, skipped and unavailable."""
    counts = {"written": 0, "skipped": 0, "unavailable": 0}
    for result in results:
        counts[result.status] += 1
    return counts
