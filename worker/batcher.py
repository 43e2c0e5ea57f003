"""Micro-batches: valid requests grouped by per-frame shape, concatenated up to max_batch frames.

A request is never split across batches, and the order of requests within a batch (and of frames
within a request) is kept, so outputs can be sliced back per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .requests import PreparedRequest

__all__ = ["Batch", "make_batches", "split_outputs"]


@dataclass
class Batch:
    """Requests that run together, and their inputs concatenated along the batch dimension."""

    requests: list[PreparedRequest]
    inputs: dict[str, npt.NDArray[Any]]
    #: The model input already on the GPU (decoded ahead while the previous batch ran), and the
    #: preprocessing it was made with; None where the infer stage prepares it itself.
    on_device: Any = None
    prepared_for: Any = None

    @property
    def encoded(self) -> list[bytes] | None:
        """The JPEGs of a batch left for the GPU decoder, or None for a batch of decoded inputs."""
        if not self.requests or self.requests[0].encoded is None:
            return None
        return [r.encoded for r in self.requests if r.encoded is not None]

    @property
    def pixels(self) -> bool:
        """Whether the inputs are uint8 pixels for the GPU to normalise (`--gpu-normalise`)."""
        return bool(self.requests) and self.requests[0].pixels

    @property
    def frames(self) -> int:
        """Frames in the batch (the first dimension of every input)."""
        return sum(r.frames for r in self.requests)


def _concatenate(requests: list[PreparedRequest]) -> dict[str, npt.NDArray[Any]]:
    if requests[0].encoded is not None:
        return {}  # decoded on the GPU when the batch runs
    names = requests[0].inputs.keys()
    if len(requests) == 1:
        return dict(requests[0].inputs)
    return {name: np.concatenate([r.inputs[name] for r in requests], axis=0) for name in names}


def make_batches(requests: Iterable[PreparedRequest], max_frames: int) -> list[Batch]:
    """Group valid requests (no error) into batches of at most `max_frames` frames."""
    groups: dict[tuple[tuple[str, tuple[int, ...]], ...], list[list[PreparedRequest]]] = {}
    filled: dict[tuple[tuple[str, tuple[int, ...]], ...], int] = {}  # frames in each group's last chunk
    for request in requests:
        if request.error is not None:
            continue
        key = request.shape_key
        chunks = groups.setdefault(key, [[]])
        current = chunks[-1]
        if current and filled[key] + request.frames > max_frames:
            current = []
            chunks.append(current)
            filled[key] = 0
        current.append(request)
        filled[key] = filled.get(key, 0) + request.frames
    return [
        Batch(requests=chunk, inputs=_concatenate(chunk)) for chunks in groups.values() for chunk in chunks
    ]


def split_outputs(batch: Batch, outputs: dict[str, npt.NDArray[Any]]) -> list[dict[str, npt.NDArray[Any]]]:
    """Slice a batch's outputs back into one dict per request, in request order."""
    frames = batch.frames
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != frames:
            raise ValueError(f"output {name} has shape {array.shape}; expected first dimension {frames}")
    result = []
    offset = 0
    for request in batch.requests:
        result.append({name: array[offset : offset + request.frames] for name, array in outputs.items()})
        offset += request.frames
    return result
