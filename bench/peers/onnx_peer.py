"""What the three peers (nats_py_worker.py, faststream_worker.py, pytriton_server.py) share, so each
serves the same model the same way: the newest ONNX version of the repository's model with jetinfer's
session options (all graph optimisations, no spinning), and the preprocessing its config.json says.
Each peer runs as a script from this folder and imports this file beside it; bench/cpu_cost.py's
engine-only process imports it as `jetinfer.bench.peers.onnx_peer`, so the reference engine is the
peers' too.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from PIL import Image


class OnnxModel(NamedTuple):
    """A loaded model: its config.json, version number, session, `preprocess` block and output name."""

    config: dict[str, Any]
    version: int
    session: ort.InferenceSession
    pre: dict[str, Any]
    output: str


def model_config(repository: Path, model: str) -> tuple[dict[str, Any], Path]:
    """The model's config.json and the newest version's model.onnx."""
    config = json.loads((repository / model / "config.json").read_text())
    version = max(int(p.name) for p in (repository / model).iterdir() if p.name.isdigit())
    return config, repository / model / str(version) / "model.onnx"


def load_model(repository: Path, model: str) -> OnnxModel:
    """The newest version of `model` in `repository`, in an ONNX Runtime session on the CPU."""
    config, model_file = model_config(repository, model)
    options = ort.SessionOptions()  # as jetinfer's onnxruntime backend: default threads, no spinning
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    version = int(model_file.parent.name)
    return OnnxModel(config, version, session, config["preprocess"], config["outputs"][0]["name"])


def preprocess(data: bytes, pre: dict[str, Any]) -> np.ndarray:
    """JPEG bytes -> (3, H, W) float32, normalised as the model's config.json says."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != (pre["width"], pre["height"]):
        image = image.resize((pre["width"], pre["height"]), Image.Resampling.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float32) - np.float32(pre["mean"])) / np.float32(pre["std"])
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
