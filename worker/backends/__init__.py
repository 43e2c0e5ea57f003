"""Inference backends: ONNX Runtime (CPU), TensorRT, PyTorch; picked by the file in a version folder."""

from .base import BACKEND_MODULES, Backend, load_backend

__all__ = ["BACKEND_MODULES", "Backend", "load_backend"]
