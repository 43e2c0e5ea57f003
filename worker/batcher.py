"""Batch: valid requests grouped by per-frame shape into immutable batches of at most max_batch frames.

A request is never split across batches, and the order of requests within a batch (and of frames
within a request) is kept, so outputs can be sliced back per request. A batch is either decoded
inputs concatenated along the batch dimension, or encoded images for the preprocessing strategy
to decode with the batch (on the GPU, or in the decoding processes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .prepare import PreparedRequest

__all__ = ["Batch", "make_batches", "split_outputs"]


@dataclass(frozen=True, slots=True, eq=False)
class Batch:
    """Requests that run together, with their inputs concatenated (or their images still encoded)."""

    requests: tuple[PreparedRequest, ...]
    inputs: dict[str, npt.NDArray[Any]]
    #: Every encoded image of the batch, in frame order (empty for a batch of decoded inputs).
    encoded: tuple[bytes, ...] = ()
    #: The model input already on the GPU (made ahead while the previous batch ran), and the
    #: preprocessing it was made with; None where the run stage makes it.
    on_device: Any = None
    prepared_for: Any = None

    @property
    def pixels(self) -> bool:
        """Whether the inputs are uint8 pixels for the GPU to normalise."""
        return bool(self.requests) and self.requests[0].pixels

    @property
    def frames(self) -> int:
        """Frames in the batch (the first dimension of every input)."""
        return sum(r.frames for r in self.requests)

    def made_ahead(self, on_device: Any, preprocess: Any) -> Batch:
        """This batch with its model input made ahead on the GPU with `preprocess`."""
        return dataclasses.replace(self, on_device=on_device, prepared_for=preprocess)


def _batch(requests: list[PreparedRequest]) -> Batch:
    if requests[0].encoded:
        return Batch(tuple(requests), {}, tuple(image for r in requests for image in r.encoded))
    if len(requests) == 1:
        return Batch((requests[0],), dict(requests[0].inputs))
    names = requests[0].inputs.keys()
    inputs = {name: np.concatenate([r.inputs[name] for r in requests], axis=0) for name in names}
    return Batch(tuple(requests), inputs)


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
    return [_batch(chunk) for chunks in groups.values() for chunk in chunks]


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
