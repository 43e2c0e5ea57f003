"""ONNX Runtime backend (model.onnx): CPU by default, CUDA or TensorRT execution providers where installed."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from jetinfer.errors import BackendError, ModelLoadError
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelVersion

from .base import Backend, BackendOptions

__all__ = ["BACKEND", "OnnxRuntimeBackend"]

logger = logging.getLogger(__name__)

_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
#: Batches run at once on the CPU unless the worker says otherwise. Two (each on half the cores) gave
#: EfficientNet-Lite0 end to end 178 -> 189 img/s under load on 2 cores, but a lone request then runs on
#: one core (idle p50 8.6 -> 12.4 ms): latency first by default, `--parallel-batches 2` for throughput.
_DEFAULT_CPU_SLOTS = 1


class OnnxRuntimeBackend(Backend):
    """Serves model.onnx with an onnxruntime InferenceSession."""

    name = "onnxruntime"

    def __init__(self, version: ModelVersion, options: BackendOptions | None = None) -> None:
        super().__init__(version, options)
        import onnxruntime as ort

        device = self.device

        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads burn the cores that decoding and NATS need between parallel sections;
        # off by default (measured: engine-only the same, end to end faster; --ort-spinning turns it on).
        session_options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.options.spinning else "0"
        )
        available = set(ort.get_available_providers())
        providers: list[Any] = []
        for provider in _PREFERRED_PROVIDERS:
            if provider not in available:
                continue
            if provider != "CPUExecutionProvider" and device is not None:
                providers.append((provider, {"device_id": device}))
            else:
                providers.append(provider)
        # On the CPU, several batches run at once with the cores shared among them: no thread of one
        # batch waits at a parallel section's barrier for a thread that decoding has preempted.
        self._slots = 1
        if providers == ["CPUExecutionProvider"]:
            self._slots = self.parallel_batches or _DEFAULT_CPU_SLOTS
        threads = self.options.intra_op_threads
        if not threads and self._slots > 1:
            threads = max(1, (os.cpu_count() or 1) // self._slots)
        if threads:
            session_options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                str(version.model_file), session_options, providers=providers
            )
        except Exception as exc:
            raise ModelLoadError(f"{version.model_file}: onnxruntime cannot load it: {exc}") from exc
        session_inputs = {i.name for i in self._session.get_inputs()}
        wanted = {spec.name for spec in version.config.inputs}
        if session_inputs != wanted:
            raise ModelLoadError(
                f"{version.model_file}: model inputs {sorted(session_inputs)} "
                f"differ from config {sorted(wanted)}"
            )
        self._output_names = [spec.name for spec in version.config.outputs]
        session_outputs = {o.name for o in self._session.get_outputs()}
        missing = set(self._output_names) - session_outputs
        if missing:
            raise ModelLoadError(f"{version.model_file}: config outputs {sorted(missing)} not in the model")
        self._dtypes = {spec.name: DATATYPES[spec.datatype] for spec in version.config.inputs}
        logger.info(
            "onnxruntime: loaded %s v%d providers=%s",
            version.config.name,
            version.version,
            self._session.get_providers(),
        )

    def infer(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch through the session."""
        session = self._session  # read once: a close() racing this call cannot take it mid-way
        if self._closed or session is None:
            raise BackendError("backend is closed")
        feed = {name: np.ascontiguousarray(array, dtype=self._dtypes[name]) for name, array in inputs.items()}
        try:
            results = session.run(self._output_names, feed)  # thread-safe: batch slots share the session
        except Exception as exc:
            raise BackendError(f"onnxruntime failed: {type(exc).__name__}: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    @property
    def batch_slots(self) -> int:
        """Batches run at once: on the CPU `parallel_batches` (default 1), each with a share of the cores."""
        return self._slots

    def close(self) -> None:
        """Drop the session (onnxruntime frees its memory when the session is collected)."""
        if not self._closed:
            self._session = None
        super().close()


BACKEND = OnnxRuntimeBackend
