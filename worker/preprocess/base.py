"""The preprocessing interface, and the strategy that decodes on the CPU threads.

A strategy decides three things for a model server, once, at start:

- which image requests keep their encoded bytes into the batch (`keeps_encoded`): the rest are
  decoded per request on the CPU decode threads (`decode_request`, Pillow releases the GIL);
- what a CPU-decoded image becomes (`decode_image`): the model's input, or uint8 pixels that the
  GPU normalises (`pixels`);
- how a batch becomes the model's input in the run stage (`model_inputs`), and whether that can be
  done ahead, on the GPU, while the previous batch runs (`ahead`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from jetinfer.errors import InvalidInputError, RequestError
from jetinfer.images import preprocess_image
from jetinfer.repository import ModelConfig, PreprocessConfig

from ..batcher import Batch
from ..prepare import PreparedRequest
from ..reload import LoadedModel

__all__ = ["CpuDecoding", "Preprocessing"]

Inputs = dict[str, Any]


class Preprocessing(abc.ABC):
    """How a model server's image requests become model inputs."""

    #: The strategy's name, as the worker logs it.
    name: ClassVar[str]
    #: Whether batches are made into model inputs on the GPU (so one batch runs at a time).
    on_gpu: ClassVar[bool] = False
    #: Whether `decode_image` gives uint8 pixels (for the GPU to normalise) rather than the model input.
    pixels: ClassVar[bool] = False

    @abc.abstractmethod
    def keeps_encoded(self, content_type: str, data: bytes) -> bool:
        """Whether an image request keeps its encoded bytes into the batch (decoded with the batch)."""

    def decode_image(self, data: bytes, config: PreprocessConfig) -> npt.NDArray[Any]:
        """One encoded image decoded on this CPU thread: (1, ...) model input (or pixels)."""
        return preprocess_image(data, config)

    def decode_request(self, request: PreparedRequest, config: ModelConfig) -> None:
        """Decode `request`'s images into its inputs on this thread; a failure sets its error."""
        preprocess = config.preprocess
        if not request.encoded or preprocess is None:
            return
        try:
            frames = [self.decode_image(image, preprocess) for image in request.encoded]
        except RequestError as exc:
            request.error = exc.detached()
            return
        except Exception as exc:  # whatever a decoder library raises, the image is what is wrong
            request.error = InvalidInputError(f"cannot decode image: {type(exc).__name__}: {exc}")
            return
        request.inputs = {preprocess.input: frames[0] if len(frames) == 1 else np.concatenate(frames)}
        request.pixels = self.pixels
        request.encoded = ()

    def wants_ahead(self, batch: Batch) -> bool:
        """Whether `batch` has work that `ahead` can do on the GPU before it runs."""
        return False

    async def ahead(self, batch: Batch, config: ModelConfig) -> Batch:
        """`batch` with its model input made ahead, where the strategy can (returned as it is else)."""
        return batch

    def model_inputs(self, batch: Batch, loaded: LoadedModel) -> Inputs:
        """The model input of `batch` for the version `loaded` (in the run stage's thread)."""
        return batch.inputs

    def describe(self) -> str:
        """One line for the start-up log: what decodes where."""
        return self.name

    def close(self) -> None:  # noqa: B027 - most strategies hold nothing to release
        """Release threads, processes and GPU memory. Safe to call twice."""


class CpuDecoding(Preprocessing):
    """Every image decoded, resized and normalised on the CPU decode threads (Pillow)."""

    name = "cpu"

    def keeps_encoded(self, content_type: str, data: bytes) -> bool:
        """Nothing stays encoded."""
        return False

    def describe(self) -> str:
        """What decodes where."""
        return "images decoded and normalised on the CPU threads"
