"""The backend interface: load a repository version, describe it, run batches, close.

A backend's `infer` is called from worker threads (never on the event loop): up to `batch_slots`
batches at once per backend instance (one, unless the backend says it runs several in parallel).
Errors from the library are translated where it is called: `raise BackendError(...) from exc` for
failures at run time, `ModelLoadError` at load time.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from jetinfer.errors import InvalidInputError, JetinferError, ModelLoadError, TooLargeError
from jetinfer.repository import ModelVersion, TensorSpec

__all__ = ["BACKEND_MODULES", "Backend", "BackendFactory", "BackendOptions", "load_backend"]

#: Backend name (from the manifest) -> module that holds its `Backend` subclass as `BACKEND`.
BACKEND_MODULES: Final = {
    "onnxruntime": f"{__package__}.onnxruntime",
    "tensorrt": f"{__package__}.tensorrt",
    "torch": f"{__package__}.torch",
}


@dataclass(frozen=True, kw_only=True)
class BackendOptions:
    """How a backend loads and runs a version. Every field is a worker setting (a flag and a `JETINFER_*`
    variable, in `jetinfer serve --help`); backends read nothing else."""

    #: GPU index (None: the first GPU CUDA_VISIBLE_DEVICES leaves visible).
    device: int | None = None
    #: Batches the worker runs at once where the backend can (onnxruntime on the CPU); 0: its choice.
    parallel_batches: int = 0
    #: Capture CUDA graphs per batch bucket (torch, TensorRT).
    cuda_graphs: bool = True
    #: torch: run floating-point models in fp16 where they run correctly so.
    fp16: bool = True
    #: torch: channels-last memory for 4-D inputs where it runs correctly so.
    channels_last: bool = True
    #: onnxruntime: intra-op threads (0: onnxruntime's choice, or the cores shared among parallel batches).
    intra_op_threads: int = 0
    #: onnxruntime: let idle intra-op threads spin (burns the cores decoding and NATS need).
    spinning: bool = False


#: What the worker calls to load a version (`load_backend`; tests pass their own).
BackendFactory = Callable[[ModelVersion, BackendOptions], "Backend"]


class Backend(abc.ABC):
    """One loaded model version."""

    name: str = "backend"

    def __init__(self, version: ModelVersion, options: BackendOptions | None = None) -> None:
        self.version = version
        self.options = options if options is not None else BackendOptions()
        self.device = self.options.device
        self.parallel_batches = self.options.parallel_batches  # asked for (0: the backend's choice)
        self._closed = False

    @property
    def batch_slots(self) -> int:
        """How many batches `infer` may run at once. GPU backends run one at a time on their stream."""
        return 1

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Input specs (shape without the batch dimension, -1 for dynamic)."""
        return self.version.config.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Output specs (shape without the batch dimension, -1 for dynamic)."""
        return self.version.config.outputs

    @property
    def accepts_device_tensors(self) -> bool:
        """Whether `infer` takes inputs already on its GPU (torch tensors), e.g. from `--gpu-decode`."""
        return False

    @property
    def max_batch(self) -> int:
        """The largest batch `infer` accepts."""
        return self.version.config.max_batch

    def _load_or_release(self, load: Callable[[], None], release: Callable[[], None], library: str) -> None:
        """Run `load`; if it fails, `release` what it got and raise ModelLoadError naming the file.

        ModelLoadError passes through as it is, jetinfer's own errors get the file name in front, and
        anything else from the library is translated with `library` named ("torch cannot load it").
        """
        where = self.version.model_file
        try:
            load()
        except ModelLoadError:
            release()
            raise
        except JetinferError as exc:
            release()
            raise ModelLoadError(f"{where}: {exc}") from exc
        except Exception as exc:
            release()
            raise ModelLoadError(f"{where}: {library} cannot load it: {type(exc).__name__}: {exc}") from exc

    def batch_of(self, inputs: dict[str, Any]) -> int:
        """The batch size of `inputs`, after checking the names, that every input has it, and the range.

        Raises InvalidInputError or TooLargeError; backends add their own per-frame checks.
        """
        wanted = sorted(spec.name for spec in self.inputs)
        if sorted(inputs) != wanted:
            raise InvalidInputError(f"inputs {sorted(inputs)} given, the model takes {wanted}")
        batches = {name: value.shape[0] if value.ndim else 0 for name, value in inputs.items()}
        batch = next(iter(batches.values()))
        if any(b != batch for b in batches.values()):
            raise InvalidInputError(f"inputs have different batch sizes: {batches}")
        if batch < 1:
            raise InvalidInputError("empty batch")
        if batch > self.max_batch:
            raise TooLargeError(f"batch of {batch} is over max_batch {self.max_batch}")
        return int(batch)

    @abc.abstractmethod
    def infer(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch. Inputs are keyed by name, first dimension the batch; outputs likewise."""

    def warmup(self) -> None:
        """Run one batch of zeros at batch 1 and at max batch, so first requests don't pay for setup."""
        for batch in sorted({1, self.max_batch}):
            dummy = {
                spec.name: np.zeros((batch, *[d if d > 0 else 1 for d in spec.shape]), dtype=_np_dtype(spec))
                for spec in self.inputs
            }
            self.infer(dummy)

    def close(self) -> None:
        """Release the model and its memory. Safe to call twice."""
        self._closed = True

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _np_dtype(spec: TensorSpec) -> np.dtype[Any]:
    from jetinfer.protocol import DATATYPES

    return DATATYPES[spec.datatype]


def load_backend(version: ModelVersion, options: BackendOptions | None = None) -> Backend:
    """Load `version` with the backend its manifest names, with `options` (defaults where None).

    `options.parallel_batches` is how many batches the worker would run at once (0: the backend's
    choice); backends that can (onnxruntime on the CPU) share the cores among them, the others ignore it.
    """
    module_name = BACKEND_MODULES.get(version.backend)
    if module_name is None:
        raise ModelLoadError(f"{version.path}: unknown backend {version.backend!r}")
    module = importlib.import_module(module_name)
    backend_cls: type[Backend] = module.BACKEND
    return backend_cls(version, options)
