"""Export a torch module to model.pt2 (`torch.export`) with a dynamic batch dimension, or check a user's
own program (`torch.export.save`) before it becomes a repository version (`check_pt2`).

The worker's torch backend (worker/backends/torch.py) loads the file with `torch.export.load`,
passes the inputs positionally in the config's input order and matches the outputs to the
config's outputs by position. Export on the CPU for a file that loads anywhere; a .pt2 file is
best loaded by the torch release that wrote it (the manifest's producer map should record it).
torch is imported only when `export_pt2` is called.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jetinfer.errors import ModelLoadError, RepositoryError, SettingsError
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelConfig

__all__ = ["check_pt2", "example_inputs", "export_pt2"]

logger = logging.getLogger(__name__)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelLoadError(f"torch is not installed; exporting model.pt2 needs it: {exc}") from exc
    return torch


def example_inputs(config: ModelConfig, batch: int, *, device: Any = "cpu", seed: int = 0) -> tuple[Any, ...]:
    """Seeded example inputs of `batch` frames for every config input, in the config's order."""
    torch = _import_torch()
    generator = np.random.default_rng(seed)
    tensors = []
    for spec in config.inputs:
        if any(d < 1 for d in spec.shape):
            raise ModelLoadError(
                f"{config.name}: input {spec.name!r} has shape {list(spec.shape)}; torch export needs every "
                "dimension but the batch fixed"
            )
        dtype = DATATYPES[spec.datatype]
        shape = (batch, *spec.shape)
        if dtype.kind == "f":
            array = generator.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            array = generator.integers(0, 2, shape).astype(dtype)
        else:
            array = generator.integers(0, 8, shape).astype(dtype)
        tensors.append(torch.from_numpy(array).to(device))
    return tuple(tensors)


def export_pt2(module: Any, out_file: Path, *, config: ModelConfig, max_batch: int) -> None:
    """Export `module` (a `torch.nn.Module`) to `out_file` with a batch dimension of 1..max_batch.

    The module is traced in eval mode (its training flag is restored afterwards), with example inputs
    of batch 2 (a batch of 1 would make torch specialise the dimension), and the file is written
    atomically: into a temporary file in the same folder, fsynced, then renamed. Raises
    `SettingsError` for a max_batch below the config's and `ModelLoadError` when torch cannot
    export the module.
    """
    if max_batch < config.max_batch:
        raise SettingsError(
            "max_batch",
            f"{max_batch} is below the model config's max_batch {config.max_batch}: the worker pads batches "
            "up to that size, which the exported program would refuse",
        )
    torch = _import_torch()
    out_file = Path(out_file)
    parameter = next(iter(module.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = example_inputs(config, 2 if max_batch >= 2 else 1, device=device)
    dynamic_shapes = None
    if max_batch >= 2:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = tuple({0: batch} for _ in config.inputs)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(module, example, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise ModelLoadError(
            f"{config.name}: torch.export cannot export the module: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        module.train(was_training)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # torch.export.save wants a name ending in .pt2: a hidden sibling that still ends in it.
    tmp = out_file.with_name(f".{out_file.stem}-{uuid.uuid4().hex[:8]}.tmp.pt2")
    try:
        torch.export.save(program, str(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out_file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    logger.info(
        "torch export: wrote %s (%s, batch 1..%d, torch %s)",
        out_file,
        config.name,
        max_batch,
        torch.__version__,
    )


def _load_program(torch: Any, path: Path) -> Any:
    # torch.export.load logs each failed attempt with a traceback before it tries the next format; the
    # error raised below says it once.
    torch_log = logging.getLogger("torch.export")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # a zip of the wrong kind, another torch's format, a plain state dict, ...
        raise RepositoryError(
            path,
            f"torch {torch.__version__} cannot load it as a torch.export program: {type(exc).__name__}: "
            f"{exc} (write one with torch.export.save(torch.export.export(model, example_inputs, "
            "dynamic_shapes=...), path))",
        ) from exc
    finally:
        torch_log.setLevel(level)


def _batch_fix(max_batch: int) -> str:
    return (
        "export it with a dynamic batch: torch.export.export(model, example_inputs, dynamic_shapes="
        f"({{0: torch.export.Dim('batch', min=1, max={max_batch})}}, ...)) with an example batch of 2"
    )


def _check_inputs(torch: Any, program: Any, path: Path, config: ModelConfig) -> list[tuple[int, ...]]:
    """The program takes the config's inputs, in order, with a batch dimension from 1 to max_batch;
    returns each input's per-frame shape for a test batch."""
    names = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if len(names) != len(config.inputs):
        raise RepositoryError(
            path,
            f"the program takes {len(names)} inputs ({', '.join(names)}), the config {len(config.inputs)} "
            f"({', '.join(s.name for s in config.inputs)}); the worker passes the config's inputs in order",
        )
    frames = []
    for name, spec in zip(names, config.inputs, strict=True):
        value = placeholders[name].meta.get("val")
        if value is None or not hasattr(value, "shape"):
            raise RepositoryError(path, f"input {name!r} (config {spec.name!r}) is not a tensor")
        wanted = torch.from_numpy(np.empty(0, dtype=DATATYPES[spec.datatype])).dtype
        if value.dtype != wanted:
            raise RepositoryError(
                path, f"input {name!r} is {value.dtype}, config input {spec.name!r} says {spec.datatype}"
            )
        shape = list(value.shape)
        if len(shape) != len(spec.shape) + 1:
            raise RepositoryError(
                path,
                f"input {name!r} has {len(shape)} dimensions, config input {spec.name!r} "
                f"{len(spec.shape) + 1} ([batch, {', '.join(map(str, spec.shape))}])",
            )
        batch = shape[0]
        if isinstance(batch, int):
            if not batch == config.max_batch == 1:
                raise RepositoryError(
                    path, f"input {name!r} has a fixed batch of {batch}; {_batch_fix(config.max_batch)}"
                )
        else:
            bounds = program.range_constraints.get(batch.node.expr)
            lower = int(bounds.lower) if bounds is not None else 0
            upper = bounds.upper if bounds is not None else config.max_batch
            if lower > 1 or upper < config.max_batch:
                raise RepositoryError(
                    path,
                    f"input {name!r} takes batches of {lower} to {upper}, the worker sends 1 to max_batch "
                    f"{config.max_batch}; {_batch_fix(config.max_batch)}",
                )
        frame = []
        for index, (got, declared) in enumerate(zip(shape[1:], spec.shape, strict=True)):
            if isinstance(got, int) and declared > 0 and got != declared:
                raise RepositoryError(
                    path,
                    f"input {name!r} dimension {index + 1} is {got}, config input {spec.name!r} says "
                    f"{declared}",
                )
            frame.append(declared if declared > 0 else got if isinstance(got, int) else 8)
        frames.append(tuple(frame))
    return frames


def check_pt2(path: Path, config: ModelConfig) -> None:
    """Check a user's torch.export program against its config before it is published: it loads, takes
    the config's inputs in order (datatypes, dimensions, a batch from 1 to max_batch), and a batch of 1
    and of 2 runs on the CPU, returning every configured output with its shape and datatype, finite.

    Raises `RepositoryError` saying what is wrong (and how to export it right).
    """
    torch = _import_torch()
    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        program = _load_program(torch, path)
    frames = _check_inputs(torch, program, path, config)
    module = program.module()
    generator = np.random.default_rng(0)
    for batch in sorted({1, min(2, config.max_batch)}):
        inputs = []
        for spec, frame in zip(config.inputs, frames, strict=True):
            dtype = DATATYPES[spec.datatype]
            array = (
                generator.standard_normal((batch, *frame)).astype(dtype)
                if dtype.kind == "f"
                else np.zeros((batch, *frame), dtype=dtype)
            )
            inputs.append(torch.from_numpy(array))
        try:
            with torch.inference_mode():
                result = module(*inputs)
        except Exception as exc:
            raise RepositoryError(
                path, f"a batch of {batch} does not run: {type(exc).__name__}: {str(exc)[:500]}"
            ) from exc
        _check_outputs(torch, result, path, config, batch)
    logger.info("torch: %s loads and runs batches of 1 and 2 (torch %s)", path, torch.__version__)


def _check_outputs(torch: Any, result: Any, path: Path, config: ModelConfig, batch: int) -> None:
    if isinstance(result, dict):
        missing = [spec.name for spec in config.outputs if spec.name not in result]
        if missing:
            raise RepositoryError(path, f"the program returns {sorted(result)}, not the config's {missing}")
        outputs = [result[spec.name] for spec in config.outputs]
    else:
        outputs = list(result) if isinstance(result, tuple | list) else [result]
    if len(outputs) < len(config.outputs):
        raise RepositoryError(
            path, f"the program returns {len(outputs)} outputs, the config names {len(config.outputs)}"
        )
    for spec, output in zip(config.outputs, outputs, strict=False):
        if not isinstance(output, torch.Tensor):
            raise RepositoryError(path, f"output {spec.name!r} is a {type(output).__name__}, not a tensor")
        array = output.detach().cpu().numpy()
        if array.shape[:1] != (batch,) or not spec.accepts(array.shape[1:]):
            raise RepositoryError(
                path,
                f"output {spec.name!r} has shape {list(array.shape)} for a batch of {batch}; the config says "
                f"[batch, {', '.join(map(str, spec.shape))}]",
            )
        if array.dtype != DATATYPES[spec.datatype]:
            raise RepositoryError(
                path, f"output {spec.name!r} is {array.dtype}, the config says {spec.datatype}"
            )
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise RepositoryError(path, f"output {spec.name!r} is not finite for a batch of {batch}")
