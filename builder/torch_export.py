"""Export a torch module to model.pt2 (`torch.export`) with a dynamic batch dimension.

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
from pathlib import Path
from typing import Any

import numpy as np

from jetinfer.errors import ModelLoadError, SettingsError
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelConfig

__all__ = ["example_inputs", "export_pt2"]

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
