"""What the three peers (nats_py_worker.py, faststream_worker.py, pytriton_server.py) share, so each
serves the same model the same way: the newest ONNX version of the repository's model with jetinfer's
session options (all graph optimisations, no spinning), and the preprocessing its config.json says.
Each peer runs as a script from this folder and imports this file beside it.
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


def load_model(repository: Path, model: str) -> OnnxModel:
    """The newest version of `model` in `repository`, in an ONNX Runtime session."""
    config = json.loads((repository / model / "config.json").read_text())
    version = max(int(p.name) for p in (repository / model).iterdir() if p.name.isdigit())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(repository / model / str(version) / "model.onnx"), options)
    return OnnxModel(config, version, session, config["preprocess"], config["outputs"][0]["name"])


def preprocess(data: bytes, pre: dict[str, Any]) -> np.ndarray:
    """JPEG bytes -> (3, H, W) float32, normalised as the model's config.json says."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != (pre["width"], pre["height"]):
        image = image.resize((pre["width"], pre["height"]), Image.Resampling.BILINEAR)
    pixels = (np.asarray(image, dtype=np.float32) - np.float32(pre["mean"])) / np.float32(pre["std"])
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
