"""PyTorch backend (model.pt2 from `torch.export`): fp16 and CUDA graphs per batch bucket on a GPU.

On a CUDA device (`--device`, else the first device CUDA_VISIBLE_DEVICES leaves visible):

- the exported program is moved to the device (`move_to_device_pass`) and run in the fastest form
  it runs correctly in: fp16 (`--torch-fp16`, default on) and channels-last memory
  (`--torch-channels-last`, default on; ResNet-50 at batch 256 on the H100: 18 ms instead of 27).
  Each form is probed with one batch at load time, falling back to fp16 without channels-last, then
  to fp32 (a graph with a `.float()` inside refuses fp16). Floating inputs are cast on the
  device; outputs are cast back to the datatypes the model config gives;
- batches are padded up to a bucket (powers of two up to max_batch, and max_batch itself), so only a
  few shapes ever run;
- one device buffer per input (max_batch rows) and one pinned host staging buffer per input and per
  output are allocated at load time; each batch is copied into the pinned buffer (large batches on
  several threads), then to the device with `non_blocking` copies on the backend's own stream;
- with CUDA graphs on (`--cuda-graphs`, default on) every bucket is warmed up and captured
  at load time (largest first, sharing one memory pool), and `infer` only replays: GPU memory stays
  flat across requests. Models with dynamic dimensions other than the batch run eagerly;
- `close()` frees graphs, buffers and weights and empties torch's cache; the stream goes back to a
  per-device pool for the next backend, so reloads do not pile up torch's per-stream cuBLAS
  workspaces.

On a CPU (no CUDA, as on CI): fp32, eager, exact batch sizes, same interface.

Inputs are passed to the program positionally in the config's input order; outputs are matched
to the config's outputs by position (a tensor, a tuple or list) or by name (a dict).
torch is imported only when a backend is created.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from jetinfer.errors import BackendError, InvalidInputError, JetinferError, ModelLoadError
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelVersion

from ..gc_tuning import collect_everything
from .base import Backend, BackendOptions
from .torch_buckets import StaticBuckets, acquire_stream, return_stream, torch_dtype

__all__ = ["BACKEND", "TorchBackend", "batch_buckets", "import_torch", "pick_device"]

logger = logging.getLogger(__name__)


def import_torch() -> Any:
    """The `torch` module, or `ModelLoadError` if it is not installed."""
    try:
        import torch
    except ImportError as exc:
        raise ModelLoadError(f"torch is not installed; model.pt2 needs it: {exc}") from exc
    return torch


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes that run: powers of two below max_batch, then max_batch (ascending)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    buckets = []
    size = 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    buckets.append(max_batch)
    return buckets


def pick_device(torch: Any, requested: int | None, path: object) -> Any:
    """The torch device a model runs on: the requested GPU, the first one, or the CPU where none is."""
    if torch.cuda.is_available():
        index = 0 if requested is None else requested
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise ModelLoadError(f"{path}: GPU {index} requested but {count} visible (CUDA_VISIBLE_DEVICES)")
        return torch.device("cuda", index)
    if requested is not None:
        raise ModelLoadError(
            f"{path}: GPU {requested} requested but torch {torch.__version__} sees no CUDA device"
        )
    return torch.device("cpu")


class TorchBackend(Backend):
    """Serves model.pt2 (a `torch.export` ExportedProgram) on a CUDA device or the CPU."""

    name = "torch"

    def __init__(self, version: ModelVersion, options: BackendOptions | None = None) -> None:
        super().__init__(version, options)
        self._lock = threading.Lock()
        self._torch: Any = None
        self._module: Any = None
        self._device: Any = None
        self._stream: Any = None
        self._compute_dtype: Any = None
        self._buckets = batch_buckets(self.max_batch)
        self._static_path: StaticBuckets | None = None  # a static model on a GPU
        self._in_dtypes = [DATATYPES[spec.datatype] for spec in self.inputs]
        self._out_dtypes = [DATATYPES[spec.datatype] for spec in self.outputs]
        self._static = all(d > 0 for spec in self.inputs for d in spec.shape)
        self.fp16 = False
        self.cuda_graphs = False
        self.channels_last = False
        self._load_or_release(self._load, self._release, "torch")

    # -- loading ---------------------------------------------------------------------------------

    @property
    def on_cuda(self) -> bool:
        """Whether the model runs on a CUDA device."""
        return self._device is not None and self._device.type == "cuda"

    @property
    def accepts_device_tensors(self) -> bool:
        """A model on a GPU takes GPU-decoded images without a trip through host memory."""
        return self.on_cuda

    def _load(self) -> None:
        torch = self._torch = import_torch()
        path = self.version.model_file
        self._device = pick_device(torch, self.device, path)
        built_with = self.version.manifest.producer.get("torch")
        if built_with and built_with.split("+")[0] != torch.__version__.split("+")[0]:
            logger.warning(
                "torch: %s was exported with torch %s, this is torch %s", path, built_with, torch.__version__
            )
        with warnings.catch_warnings():
            # torch's own loader wraps the archive's read-only bytes in tensors (torch 2.11 warns, once).
            warnings.filterwarnings(
                "ignore", message="The given buffer is not writable", category=UserWarning
            )
            program = torch.export.load(str(path))
        if self.on_cuda:
            try:
                from torch.export.passes import move_to_device_pass
            except ImportError:  # older torch: device arguments inside the graph stay as exported
                pass
            else:
                program = move_to_device_pass(program, self._device)
            self.cuda_graphs = self.options.cuda_graphs
            self._module = self._fastest_module(program, self.options.fp16, self.options.channels_last)
        else:
            self._module = program.module()
        if self.on_cuda and self._static:
            self._stream = acquire_stream(torch, self._device)
            self._static_path = StaticBuckets(
                torch,
                self._device,
                self._stream,
                inputs=self.inputs,
                outputs=self.outputs,
                buckets=self._buckets,
                forward=self._forward,
                check_outputs=self._check_outputs,
            )
            self._static_path.prepare(graphs=self.cuda_graphs)
        elif self.on_cuda:
            self.cuda_graphs = False
            self._stream = acquire_stream(torch, self._device)
            logger.info("torch: %s has dynamic dimensions besides the batch: no CUDA graphs", path)
        elif self._static:
            with torch.inference_mode():
                self._check_outputs(self._forward(self._probe_inputs()), 1)
        logger.info(
            "torch: loaded %s v%d on %s (%s%s, CUDA graphs %s, buckets %s)",
            self.version.config.name,
            self.version.version,
            self._device,
            "fp16" if self.fp16 else "fp32",
            ", channels-last" if self.channels_last else "",
            "on" if self.cuda_graphs else "off",
            self._buckets if self.on_cuda else "none",
        )

    def _probe_inputs(self) -> list[Any]:
        """Zeros of batch 1 for every input (of a model without dynamic dimensions) on its device."""
        torch = self._torch
        return [
            torch.zeros(
                (1, *spec.shape),
                dtype=torch_dtype(torch, spec.datatype),
                device=self._device,
            )
            for spec in self.inputs
        ]

    def _fastest_module(self, program: Any, fp16: bool, channels_last: bool) -> Any:
        """The program's module in the fastest form it runs correctly in: fp16 / channels-last if asked.

        Not every exported graph survives a cast (a `.float()` or a `view` inside it can refuse half
        precision or channels-last tensors): each form is probed with one batch, falling back to
        fp16 without channels-last, then to fp32.
        """
        torch = self._torch
        forms = [(fp16, channels_last), (fp16, False), (False, False)]
        tried: list[tuple[bool, bool]] = []
        for half, nhwc in forms:
            if (half, nhwc) in tried:
                continue
            tried.append((half, nhwc))
            module = program.module().to(self._device)
            module = module.to(torch.float16 if half else torch.float32)
            if nhwc:
                module = module.to(memory_format=torch.channels_last)
            self._module, self.fp16, self.channels_last = module, half, nhwc
            self._compute_dtype = torch.float16 if half else None
            if not self._static:
                return module  # no fixed shape to probe with: errors show at inference
            try:
                with torch.cuda.device(self._device), torch.inference_mode():
                    self._check_outputs(self._forward(self._probe_inputs()), 1)
                    torch.cuda.synchronize(self._device)
            except ModelLoadError:
                raise
            except Exception as exc:
                if (half, nhwc) == (False, False):
                    raise
                logger.warning(
                    "torch: %s does not run %s%s (%s: %s); trying without",
                    self.version.model_file,
                    "in fp16" if half else "",
                    " channels-last" if nhwc else "",
                    type(exc).__name__,
                    exc,
                )
                continue
            return module
        raise AssertionError("unreachable: the fp32 form either returns or raises")

    def _forward(self, inputs: Sequence[Any]) -> list[Any]:
        """Run the program; floating inputs go in the compute dtype, outputs come back in the config's."""
        torch = self._torch
        if self._compute_dtype is not None:
            inputs = [x.to(self._compute_dtype) if x.is_floating_point() else x for x in inputs]
        if self.channels_last:
            inputs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs]
        result = self._module(*inputs)
        if isinstance(result, torch.Tensor):
            outputs = [result]
        elif isinstance(result, dict):
            missing = [spec.name for spec in self.outputs if spec.name not in result]
            if missing:
                raise ModelLoadError(f"{self.version.model_file}: the program returns no {missing}")
            outputs = [result[spec.name] for spec in self.outputs]
        elif isinstance(result, (tuple, list)):
            outputs = list(result)
        else:
            raise ModelLoadError(f"{self.version.model_file}: the program returns a {type(result).__name__}")
        if len(outputs) != len(self.outputs):
            raise ModelLoadError(
                f"{self.version.model_file}: the program returns {len(outputs)} outputs, the config names "
                f"{len(self.outputs)}"
            )
        return [
            out.to(torch_dtype(torch, spec.datatype)) for out, spec in zip(outputs, self.outputs, strict=True)
        ]

    def _check_outputs(self, outputs: Sequence[Any], batch: int) -> None:
        for output, spec in zip(outputs, self.outputs, strict=True):
            shape = tuple(output.shape)
            if not shape or shape[0] != batch or not spec.accepts(shape[1:]):
                raise ModelLoadError(
                    f"{self.version.model_file}: output {spec.name!r} has shape {list(shape)} for a batch of "
                    f"{batch}, the config says [batch, {', '.join(map(str, spec.shape))}]"
                )

    # -- inference -------------------------------------------------------------------------------

    def _validate(self, inputs: dict[str, npt.NDArray[Any]]) -> int:
        """Check names, shapes, dtypes and batch size; return the batch size."""
        batch = self.batch_of(inputs)
        for spec, dtype in zip(self.inputs, self._in_dtypes, strict=True):
            array = inputs[spec.name]
            if array.ndim != len(spec.shape) + 1 or not spec.accepts(array.shape[1:]):
                raise InvalidInputError(
                    f"input {spec.name!r}: shape {list(array.shape)}, the model takes "
                    f"[batch, {', '.join(map(str, spec.shape))}]"
                )
            if self._is_device_tensor(array):
                pass  # a tensor already on the GPU (images decoded there): copied with a cast below
            elif not np.can_cast(array.dtype, dtype, "same_kind"):
                raise InvalidInputError(
                    f"input {spec.name!r}: {array.dtype} given, the model takes {spec.datatype}"
                )
        return batch

    def infer(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch (padded to its bucket on a GPU)."""
        with self._lock:
            if self._closed or self._module is None:
                raise BackendError("backend is closed")
            batch = self._validate(inputs)
            torch = self._torch
            try:
                with torch.inference_mode():
                    if not self.on_cuda:
                        return self._infer_cpu(inputs)
                    with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
                        if self._static_path is not None:
                            return self._static_path.run(inputs, batch)
                        return self._infer_dynamic(inputs)
            except JetinferError:
                raise
            except torch.cuda.OutOfMemoryError as exc:
                raise BackendError(f"torch ran out of GPU memory on a batch of {batch}: {exc}") from exc
            except Exception as exc:
                raise BackendError(f"torch failed: {type(exc).__name__}: {exc}") from exc

    def _is_device_tensor(self, value: Any) -> bool:
        """Whether an input is a torch tensor on a GPU (GPU-decoded images) rather than a numpy array."""
        torch = self._torch
        return torch is not None and isinstance(value, torch.Tensor) and bool(value.is_cuda)

    def _tensors_from(self, inputs: dict[str, npt.NDArray[Any]]) -> list[Any]:
        torch, tensors = self._torch, []
        for spec, dtype in zip(self.inputs, self._in_dtypes, strict=True):
            if self._is_device_tensor(inputs[spec.name]):
                tensors.append(inputs[spec.name])
                continue
            array = np.ascontiguousarray(inputs[spec.name], dtype=dtype)
            if not array.flags.writeable:
                array = array.copy()  # torch wants writable memory
            tensors.append(torch.from_numpy(array))
        return tensors

    def _outputs_to_numpy(self, outputs: Sequence[Any]) -> dict[str, npt.NDArray[Any]]:
        return {spec.name: out.cpu().numpy() for spec, out in zip(self.outputs, outputs, strict=True)}

    def _infer_cpu(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        return self._outputs_to_numpy(self._forward(self._tensors_from(inputs)))

    def _infer_dynamic(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        tensors = [
            t if t.is_cuda else t.pin_memory().to(self._device, non_blocking=True)
            for t in self._tensors_from(inputs)
        ]
        result = self._outputs_to_numpy(self._forward(tensors))
        self._stream.synchronize()
        return result

    @property
    def graph_count(self) -> int:
        """How many CUDA graphs are captured (one per bucket with graphs on, else 0)."""
        return self._static_path.graph_count if self._static_path is not None else 0

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes a GPU batch is padded up to."""
        return tuple(self._buckets)

    # -- closing ---------------------------------------------------------------------------------

    def _release(self) -> None:
        torch = self._torch
        on_cuda = self.on_cuda
        stream, self._stream = self._stream, None
        if on_cuda and stream is not None:
            try:
                stream.synchronize()
            except Exception:
                logger.exception("torch: synchronising before release failed")
                stream = None  # not reused
        if self._static_path is not None:
            self._static_path.release()
            self._static_path = None
        self._module = None
        if on_cuda and stream is not None:
            return_stream(self._device, stream)
        if on_cuda and torch is not None:
            # An exported GraphModule sits in reference cycles: collect it now, so that its weights
            # leave the GPU with this close and not at some later garbage collection (frozen or not).
            collect_everything()
            try:
                torch.cuda.synchronize(self._device)
                torch.cuda.empty_cache()
            except Exception:
                logger.exception("torch: emptying the CUDA cache failed")

    def close(self) -> None:
        """Free graphs, buffers and the module, and return cached GPU memory. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._release()
            super().close()


BACKEND = TorchBackend
