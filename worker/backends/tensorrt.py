"""TensorRT backend (model.plan): named I/O tensors, pinned buffers, one stream, optional CUDA graphs.

Loading, in order (each failure is a `ModelLoadError` that says what to do, never a crash):

1. TensorRT and cuda-python must be importable (`import tensorrt` alone is not enough: the
   `tensorrt-stubs` package leaves an empty namespace package behind).
2. The manifest's ``"tensorrt"`` map (``version``, ``compute_capability``, written by the builder)
   must match the running TensorRT release and the GPU (`check_compatibility`): a plan only loads
   on the TensorRT release and GPU architecture it was built for.
3. The plan is deserialised and its I/O tensors (TensorRT 10 names, no binding indexes) are checked
   against the model config: names, datatypes, shapes, a dynamic batch dimension whose
   optimisation profile 0 covers 1..max_batch, linear device tensors.
4. For every I/O tensor one pinned host buffer and one device buffer are allocated, sized for
   max_batch with the other dimensions at the profile's largest shape, and bound to the execution
   context once (`set_tensor_address`): nothing is allocated per request.

`infer`: validate the batch against the engine's shapes, copy each input into its pinned buffer,
`set_input_shape`, async host-to-device copies, `execute_async_v3` (or the CUDA graph captured for
that shape), async device-to-host copies, stream synchronise, copy the outputs out. With CUDA graphs
on (`--cuda-graphs`, default on), the first batch of each shape runs normally and the
enqueue is then captured; later batches of that shape launch the graph. A capture TensorRT cannot
do (loops, data-dependent shapes) is logged once and that shape runs without a graph.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from jetinfer.errors import BackendError, InvalidInputError, JetinferError, ModelLoadError
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelVersion
from jetinfer.tensorrt_log import tensorrt_logger, tensorrt_said

from . import cuda
from .base import Backend, BackendOptions

if TYPE_CHECKING:
    # tensorrt-stubs installs its .pyi files without a py.typed marker: see `import_tensorrt`.
    import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

__all__ = ["BACKEND", "TensorRTBackend", "check_compatibility", "import_tensorrt", "same_release"]

logger = logging.getLogger(__name__)

#: TensorRT DataType name -> wire datatype. Others (BF16, FP8, INT4, ...) have no numpy dtype here.
TRT_DATATYPES: Final[Mapping[str, str]] = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}

_NOT_INSTALLED: Final = (
    "TensorRT is not installed (the `tensorrt` package with its libraries, e.g. NVIDIA's container "
    "image); model.plan needs it. Serve the model's model.onnx or model.pt2 version instead"
)


def import_tensorrt() -> Any:
    """The `tensorrt` module, or `ModelLoadError` if the real TensorRT is not importable."""
    try:
        import tensorrt  # type: ignore[import-untyped, unused-ignore]
    except ImportError as exc:
        raise ModelLoadError(f"{_NOT_INSTALLED}: {exc}") from exc
    except Exception as exc:  # its libraries fail to load (wrong CUDA, missing libnvinfer)
        raise ModelLoadError(f"TensorRT cannot be imported: {type(exc).__name__}: {exc}") from exc
    if not hasattr(tensorrt, "Runtime") or not hasattr(tensorrt, "__version__"):
        # tensorrt-stubs ships only .pyi files: `import tensorrt` then yields an empty namespace package.
        raise ModelLoadError(f"{_NOT_INSTALLED} (only type stubs are present)")
    return tensorrt


def _release_of(version: str) -> tuple[int, ...]:
    parts = version.strip().split(".")
    try:
        return tuple(int(p) for p in parts[:3])
    except ValueError:
        raise ModelLoadError(f"TensorRT version {version!r} is not of the form major.minor.patch") from None


def same_release(built: str, running: str) -> bool:
    """Whether two TensorRT versions are the same release (major.minor.patch; the build number may differ)."""
    return _release_of(built) == _release_of(running)


def check_compatibility(
    engine_info: Mapping[str, str], *, tensorrt_version: str, compute_capability: str, where: object
) -> None:
    """Refuse a plan built for another TensorRT release or GPU architecture, before deserialising it.

    `engine_info` is the manifest's ``"tensorrt"`` map (``version`` and ``compute_capability``, as
    `builder.tensorrt_engine.build_engine` returns them). Raises `ModelLoadError` saying what differs.
    """
    built_version = engine_info.get("version", "")
    built_cc = engine_info.get("compute_capability", "")
    if not built_version or not built_cc:
        raise ModelLoadError(
            f"{where}: the manifest does not say which TensorRT version and GPU the plan was built for "
            f'(its "tensorrt" map needs "version" and "compute_capability"); rebuild it with '
            f"`jetinfer build --backend tensorrt`"
        )
    if not same_release(built_version, tensorrt_version):
        raise ModelLoadError(
            f"{where}: the plan was built with TensorRT {built_version} but this worker runs TensorRT "
            f"{tensorrt_version}; plans only load on the release they were built with: rebuild it here"
        )
    if built_cc.strip() != compute_capability.strip():
        raise ModelLoadError(
            f"{where}: the plan was built for GPUs of compute capability {built_cc} but this GPU is "
            f"{compute_capability}; plans are specific to a GPU architecture: rebuild it on this GPU"
        )


@dataclass
class _Tensor:
    """One engine I/O tensor and its buffers."""

    name: str
    is_input: bool
    datatype: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # the engine's shape, batch first, -1 for dynamic
    min_shape: tuple[int, ...] = ()  # inputs: profile 0's smallest shape
    max_shape: tuple[int, ...] = ()  # inputs: profile 0's largest shape
    host: cuda.HostBuffer | None = None
    device: cuda.DeviceBuffer | None = None

    def check_frame(self, shape: tuple[int, ...]) -> None:
        """Refuse an input whose per-frame shape (no batch) the engine cannot take."""
        if len(shape) != len(self.shape) - 1:
            raise InvalidInputError(
                f"input {self.name!r}: {len(shape) + 1} dimensions given, the engine takes {len(self.shape)} "
                f"(shape {list(self.shape)})"
            )
        for axis, (size, fixed, low, high) in enumerate(
            zip(shape, self.shape[1:], self.min_shape[1:], self.max_shape[1:], strict=True), start=1
        ):
            if (fixed != -1 and size != fixed) or not low <= size <= high:
                raise InvalidInputError(
                    f"input {self.name!r}: dimension {axis} is {size}, the engine takes "
                    + (f"{fixed}" if fixed != -1 else f"{low}..{high}")
                )


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _gpu_index(device: int | None) -> int:
    return 0 if device is None else device


class TensorRTBackend(Backend):
    """Serves model.plan with the TensorRT runtime and cuda-python."""

    name = "tensorrt"

    def __init__(self, version: ModelVersion, options: BackendOptions | None = None) -> None:
        super().__init__(version, options)
        self._gpu = _gpu_index(self.device)
        self._use_graphs = self.options.cuda_graphs
        self._lock = threading.Lock()
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: cuda.Stream | None = None
        self._tensors: dict[str, _Tensor] = {}
        self._graphs: dict[tuple[tuple[int, ...], ...], cuda.Graph] = {}
        self._no_graph: set[tuple[tuple[int, ...], ...]] = set()
        self._min_batch = 1
        self._load_or_release(self._load, self._release, "TensorRT")

    # -- loading ---------------------------------------------------------------------------------

    def _load(self) -> None:
        import_tensorrt()
        import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

        cuda.runtime()
        path = self.version.model_file
        try:
            count = cuda.device_count()
        except cuda.CudaError as exc:
            raise ModelLoadError(f"{path}: no usable CUDA device: {exc}") from exc
        if not 0 <= self._gpu < count:
            raise ModelLoadError(
                f"{path}: GPU {self._gpu} requested but {count} visible (CUDA_VISIBLE_DEVICES)"
            )
        cuda.set_device(self._gpu)
        check_compatibility(
            self.version.manifest.tensorrt,
            tensorrt_version=str(trt.__version__),
            compute_capability=cuda.compute_capability(self._gpu),
            where=path,
        )
        self._runtime = trt.Runtime(tensorrt_logger())
        engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise ModelLoadError(f"{path}: TensorRT could not deserialise the plan{tensorrt_said()}")
        self._engine = engine
        self._describe(engine)
        context = engine.create_execution_context()
        if context is None:
            raise ModelLoadError(f"{path}: TensorRT could not create an execution context{tensorrt_said()}")
        self._context = context
        self._stream = cuda.Stream()
        self._allocate(context)
        logger.info(
            "tensorrt: loaded %s v%d on GPU %d (TensorRT %s, max_batch %d, CUDA graphs %s)",
            self.version.config.name,
            self.version.version,
            self._gpu,
            trt.__version__,
            self.max_batch,
            "on" if self._use_graphs else "off",
        )

    def _describe(self, engine: trt.ICudaEngine) -> None:
        """Read the engine's I/O tensors and check them against the model config."""
        import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

        path, config = self.version.model_file, self.version.config
        input_names = {spec.name for spec in config.inputs}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            mode = engine.get_tensor_mode(name)
            if mode not in (trt.TensorIOMode.INPUT, trt.TensorIOMode.OUTPUT):
                continue
            trt_dtype = engine.get_tensor_dtype(name)
            datatype = TRT_DATATYPES.get(trt_dtype.name)
            if datatype is None:
                raise ModelLoadError(
                    f"{path}: tensor {name!r} has TensorRT type {trt_dtype.name}, which is not served"
                )
            if engine.get_tensor_location(name) != trt.TensorLocation.DEVICE:
                raise ModelLoadError(f"{path}: tensor {name!r} is a host (shape) tensor, which is not served")
            if engine.get_tensor_format(name) != trt.TensorFormat.LINEAR:
                raise ModelLoadError(f"{path}: tensor {name!r} is not in linear format, which is not served")
            tensor = _Tensor(
                name=name,
                is_input=mode == trt.TensorIOMode.INPUT,
                datatype=datatype,
                dtype=DATATYPES[datatype],
                shape=_dims(engine.get_tensor_shape(name)),
            )
            if tensor.is_input:
                smallest, _, largest = engine.get_tensor_profile_shape(name, 0)
                tensor.min_shape, tensor.max_shape = _dims(smallest), _dims(largest)
            self._tensors[name] = tensor
        engine_inputs = sorted(t.name for t in self._tensors.values() if t.is_input)
        config_inputs = sorted(spec.name for spec in config.inputs)
        if engine_inputs != config_inputs:
            raise ModelLoadError(
                f"{path}: engine inputs {engine_inputs} differ from the config's {config_inputs}"
            )
        for spec in (*config.inputs, *config.outputs):
            found = self._tensors.get(spec.name)
            if found is None or found.is_input != (spec.name in input_names):
                raise ModelLoadError(
                    f"{path}: the config's tensor {spec.name!r} is not an engine "
                    f"{'input' if spec.name in input_names else 'output'}"
                )
            tensor = found
            if tensor.datatype != spec.datatype:
                raise ModelLoadError(
                    f"{path}: tensor {spec.name!r} is {tensor.datatype} in the engine, "
                    f"{spec.datatype} in the config"
                )
            if len(tensor.shape) != len(spec.shape) + 1 or any(
                e != -1 and c != -1 and e != c for e, c in zip(tensor.shape[1:], spec.shape, strict=True)
            ):
                raise ModelLoadError(
                    f"{path}: tensor {spec.name!r} has shape {list(tensor.shape)} in the engine, "
                    f"[batch, {', '.join(map(str, spec.shape))}] in the config"
                )
            if tensor.shape[0] != -1:
                raise ModelLoadError(
                    f"{path}: tensor {spec.name!r} has a fixed batch dimension "
                    f"({tensor.shape[0]}); build the engine with a dynamic batch"
                )
            if tensor.is_input:
                low, high = tensor.min_shape[0], tensor.max_shape[0]
                if high < config.max_batch or low > config.max_batch:
                    raise ModelLoadError(
                        f"{path}: input {spec.name!r} takes batches of {low}..{high} "
                        f"(optimisation profile 0), the config's max_batch is {config.max_batch}"
                    )
                self._min_batch = max(self._min_batch, low)
        if engine.num_optimization_profiles > 1:
            logger.info(
                "tensorrt: %s has %d optimisation profiles; using profile 0",
                path,
                engine.num_optimization_profiles,
            )

    def _allocate(self, context: trt.IExecutionContext) -> None:
        """Pinned and device buffers for the largest batch, bound to the context once."""
        path, max_batch = self.version.model_file, self.max_batch
        inputs = [t for t in self._tensors.values() if t.is_input]
        for tensor in inputs:
            largest = (max_batch, *tensor.max_shape[1:])
            if not context.set_input_shape(tensor.name, largest):
                raise ModelLoadError(
                    f"{path}: cannot set input {tensor.name!r} to {list(largest)}{tensorrt_said()}"
                )
        for tensor in self._tensors.values():
            shape = (
                (max_batch, *tensor.max_shape[1:])
                if tensor.is_input
                else _dims(context.get_tensor_shape(tensor.name))
            )
            if any(d < 0 for d in shape):
                raise ModelLoadError(
                    f"{path}: output {tensor.name!r} has a data-dependent shape {list(shape)}, "
                    "which is not served"
                )
            nbytes = max(1, math.prod(shape) * tensor.dtype.itemsize)
            tensor.host = cuda.HostBuffer(nbytes)
            tensor.device = cuda.DeviceBuffer(nbytes)
            if not context.set_tensor_address(tensor.name, tensor.device.ptr):
                raise ModelLoadError(f"{path}: cannot bind tensor {tensor.name!r}{tensorrt_said()}")

    # -- inference -------------------------------------------------------------------------------

    def _validate(self, inputs: dict[str, npt.NDArray[Any]]) -> int:
        """Check names, ranks, per-frame shapes and the batch size; return the batch size."""
        batch = self.batch_of(inputs)
        for name, array in inputs.items():
            self._tensors[name].check_frame(tuple(array.shape[1:]))
        return batch

    def infer(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch: pinned copy-in, async H2D, execute (or graph), async D2H, synchronise."""
        with self._lock:
            if self._closed or self._context is None or self._stream is None:
                raise BackendError("backend is closed")
            batch = self._validate(inputs)
            context, stream = self._context, self._stream
            cuda.set_device(self._gpu)
            run_batch = max(batch, self._min_batch)
            key: list[tuple[int, ...]] = []
            for name in sorted(inputs):
                tensor, array = self._tensors[name], inputs[name]
                assert tensor.host is not None
                assert tensor.device is not None
                shape = (run_batch, *array.shape[1:])
                staged = tensor.host.view(tensor.dtype, shape)
                try:
                    cuda.stage(staged[:batch], array)
                except TypeError as exc:
                    raise InvalidInputError(
                        f"input {name!r}: {array.dtype} given, the model takes {tensor.datatype}"
                    ) from exc
                if not context.set_input_shape(name, shape):
                    raise BackendError(
                        f"TensorRT refused shape {list(shape)} for input {name!r}{tensorrt_said()}"
                    )
                stream.copy_to_device(tensor.device.ptr, tensor.host.ptr, staged.nbytes)
                key.append(shape)
            self._enqueue(context, stream, tuple(key))
            shapes: dict[str, tuple[int, ...]] = {}
            for tensor in self._tensors.values():
                if tensor.is_input:
                    continue
                assert tensor.host is not None
                assert tensor.device is not None
                shape = _dims(context.get_tensor_shape(tensor.name))
                shapes[tensor.name] = shape
                stream.copy_to_host(
                    tensor.host.ptr, tensor.device.ptr, math.prod(shape) * tensor.dtype.itemsize
                )
            stream.synchronize()
            outputs: dict[str, npt.NDArray[Any]] = {}
            for spec in self.outputs:
                tensor = self._tensors[spec.name]
                assert tensor.host is not None
                outputs[spec.name] = np.array(tensor.host.view(tensor.dtype, shapes[spec.name])[:batch])
            return outputs

    def _execute(self, context: trt.IExecutionContext, stream: cuda.Stream) -> None:
        if not context.execute_async_v3(stream.handle):
            raise BackendError(f"TensorRT execute_async_v3 failed{tensorrt_said()}")

    def _enqueue(
        self, context: trt.IExecutionContext, stream: cuda.Stream, key: tuple[tuple[int, ...], ...]
    ) -> None:
        """Launch the graph for this input shape, or execute and then capture one for next time."""
        graph = self._graphs.get(key)
        if graph is not None:
            graph.launch(stream)
            return
        # The first run of a shape executes normally: it also applies TensorRT's deferred shape updates,
        # which must not happen inside a capture.
        self._execute(context, stream)
        if not self._use_graphs or key in self._no_graph:
            return
        stream.synchronize()
        try:
            self._graphs[key] = stream.capture(lambda: self._execute(context, stream))
        except BackendError as exc:
            self._no_graph.add(key)
            logger.warning(
                "tensorrt: %s: CUDA graph capture failed for input shapes %s, running without a graph: %s",
                self.version.config.name,
                list(key),
                exc,
            )

    @property
    def graph_count(self) -> int:
        """How many CUDA graphs are captured (one per input shape seen, with graphs on)."""
        return len(self._graphs)

    # -- closing ---------------------------------------------------------------------------------

    def _release(self) -> None:
        """Free graphs, context, engine, buffers and stream; failures are logged, never raised."""
        try:
            if self._stream is not None or self._tensors:
                cuda.set_device(self._gpu)
        except JetinferError as exc:
            logger.error("tensorrt: cannot select GPU %d to release its memory: %s", self._gpu, exc)
        graphs, self._graphs = list(self._graphs.values()), {}
        cuda.close_all(graphs)
        if self._stream is not None:
            try:
                self._stream.synchronize()
            except cuda.CudaError as exc:
                logger.error("tensorrt: synchronising before release failed: %s", exc)
        # TensorRT frees a context's, an engine's and a runtime's memory when they are dropped, in this order.
        self._context = None
        self._engine = None
        self._runtime = None
        buffers: list[cuda.Closable] = []
        for tensor in self._tensors.values():
            buffers.extend(b for b in (tensor.host, tensor.device) if b is not None)
            tensor.host = tensor.device = None
        cuda.close_all(buffers)
        if self._stream is not None:
            stream, self._stream = self._stream, None
            cuda.close_all([stream])

    def close(self) -> None:
        """Release the engine and every buffer, graph and stream. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._release()
            super().close()


BACKEND = TensorRTBackend
