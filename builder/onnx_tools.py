"""ONNX Runtime checks of an ONNX file: open it, read its signature, compare it with a config, run it.

Only onnxruntime is needed (a runtime dependency), not the `onnx` package, so `jetinfer build` works
in a serving image too. Every failure is a `RepositoryError` naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from jetinfer.errors import RepositoryError
from jetinfer.protocol import DATATYPES, MODEL_NAME_PATTERN
from jetinfer.repository import ModelConfig, TensorSpec

__all__ = [
    "DEFAULT_MAX_BATCH",
    "ORT_DATATYPES",
    "OnnxSignature",
    "check_signature",
    "config_from_signature",
    "open_session",
    "read_signature",
    "smoke_run",
    "with_max_batch",
]

#: ONNX Runtime type strings -> wire datatypes.
ORT_DATATYPES: Final = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}

#: max_batch of a config derived from a graph whose batch dimension is dynamic.
DEFAULT_MAX_BATCH: Final = 32

#: Stand-in length for dynamic (-1) non-batch dimensions in a smoke run.
_DYNAMIC_DIM_STANDIN: Final = 8


@dataclass(frozen=True)
class OnnxSignature:
    """A graph's inputs and outputs as specs without the batch dimension, and its batch size if fixed."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fixed_batch: int | None


def open_session(path: Path, *, threads: int = 1) -> Any:
    """An onnxruntime CPU session for `path`; RepositoryError when onnxruntime cannot load it."""
    import onnxruntime as ort

    if not path.is_file():
        raise RepositoryError(path, "no such file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RepositoryError(path, f"onnxruntime cannot load it: {message}") from exc


def _spec(path: Path, node: Any, kind: str) -> tuple[TensorSpec, int | None]:
    datatype = ORT_DATATYPES.get(node.type)
    if datatype is None:
        raise RepositoryError(
            path, f"{kind} {node.name!r} has type {node.type}, which the wire protocol cannot carry"
        )
    shape = list(node.shape)
    if not shape:
        raise RepositoryError(
            path, f"{kind} {node.name!r} is a scalar; jetinfer needs a leading batch dimension"
        )
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
    return TensorSpec(node.name, datatype, dims), batch


def read_signature(session: Any, path: Path) -> OnnxSignature:
    """The inputs and outputs of an open session (batch dimension split off)."""
    inputs, outputs, batches = [], [], set()
    for node in session.get_inputs():
        spec, batch = _spec(path, node, "input")
        inputs.append(spec)
        batches.add(batch)
    for node in session.get_outputs():
        spec, batch = _spec(path, node, "output")
        outputs.append(spec)
        batches.add(batch)
    fixed = {b for b in batches if b is not None}
    return OnnxSignature(tuple(inputs), tuple(outputs), min(fixed) if fixed else None)


def config_from_signature(
    signature: OnnxSignature, name: str, *, max_batch: int | None = None
) -> ModelConfig:
    """A config for a graph with no config.json: its inputs and outputs, no preprocessing."""
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise RepositoryError(name, "invalid model name: must match [a-z0-9_-]{1,64}")
    if max_batch is None:
        max_batch = signature.fixed_batch or DEFAULT_MAX_BATCH
    return ModelConfig(name=name, max_batch=max_batch, inputs=signature.inputs, outputs=signature.outputs)


def _compatible(model: TensorSpec, config: TensorSpec) -> bool:
    if len(model.shape) != len(config.shape):
        return False
    return all(m == -1 or m == c for m, c in zip(model.shape, config.shape, strict=True))


def check_signature(signature: OnnxSignature, config: ModelConfig, path: Path) -> None:
    """Refuse a graph whose inputs/outputs (names, datatypes, shapes, batch) disagree with `config`."""
    model_inputs = {t.name: t for t in signature.inputs}
    model_outputs = {t.name: t for t in signature.outputs}
    wanted_inputs = {t.name for t in config.inputs}
    if set(model_inputs) != wanted_inputs:
        raise RepositoryError(
            path, f"graph inputs {sorted(model_inputs)} differ from the config's {sorted(wanted_inputs)}"
        )
    missing = [t.name for t in config.outputs if t.name not in model_outputs]
    if missing:
        raise RepositoryError(path, f"config outputs {missing} are not graph outputs {sorted(model_outputs)}")
    for kind, specs, graph in (
        ("input", config.inputs, model_inputs),
        ("output", config.outputs, model_outputs),
    ):
        for spec in specs:
            found = graph[spec.name]
            if found.datatype != spec.datatype:
                raise RepositoryError(
                    path,
                    f"{kind} {spec.name!r} is {found.datatype} in the graph, {spec.datatype} in the config",
                )
            if not _compatible(found, spec):
                raise RepositoryError(
                    path,
                    f"{kind} {spec.name!r} has shape {list(found.shape)} in the graph (without batch), "
                    f"{list(spec.shape)} in the config",
                )
    if signature.fixed_batch is not None and signature.fixed_batch < config.max_batch:
        raise RepositoryError(
            path,
            f"the graph's batch dimension is fixed at {signature.fixed_batch}, below max_batch "
            f"{config.max_batch}; export it with a dynamic batch axis or lower --max-batch",
        )


def smoke_run(
    session: Any, config: ModelConfig, path: Path, *, batch: int = 1
) -> dict[str, npt.NDArray[Any]]:
    """Run one batch of zeros and check the outputs' datatypes and shapes against `config`."""
    feed = {}
    for spec in config.inputs:
        shape = (batch, *(_DYNAMIC_DIM_STANDIN if d == -1 else d for d in spec.shape))
        feed[spec.name] = np.zeros(shape, dtype=DATATYPES[spec.datatype])
    names = [spec.name for spec in config.outputs]
    try:
        results = session.run(names, feed)
    except Exception as exc:
        raise RepositoryError(path, f"onnxruntime failed on a batch of {batch} zeros: {exc}") from exc
    outputs = dict(zip(names, results, strict=True))
    for spec in config.outputs:
        array = np.asarray(outputs[spec.name])
        if array.dtype != DATATYPES[spec.datatype]:
            raise RepositoryError(
                path, f"output {spec.name!r} came back as {array.dtype}, config says {spec.datatype}"
            )
        if array.ndim == 0 or array.shape[0] != batch or not spec.accepts(array.shape[1:]):
            raise RepositoryError(
                path,
                f"output {spec.name!r} came back with shape {list(array.shape)} for a batch of {batch}; "
                f"config says [{batch}, {', '.join(map(str, spec.shape))}]",
            )
    return outputs


def with_max_batch(config: ModelConfig, max_batch: int | None) -> ModelConfig:
    """`config` with `max_batch` replaced (unchanged when None)."""
    return config if max_batch is None else dataclasses.replace(config, max_batch=max_batch)
