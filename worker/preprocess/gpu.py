"""The strategies that make the model input on the GPU: normalise there, decode JPEGs there, or decode
in processes into shared memory and normalise there.

Each keeps its own CUDA stream and one `gpu-prep` thread: while the engine runs batch N, batch N+1 is
made ahead there (`ahead`); with the engine idle the run stage makes it itself (a lone request saves
the round trip). A batch that cannot be made ahead (a bad image) is left to the run stage, whose
splitting finds the request that fails. A new model version with other preprocessing gets new tools,
built aside and then swapped in, so a batch being made ahead keeps the ones it started with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from jetinfer.errors import BackendError, RequestError
from jetinfer.images import decode_pixels
from jetinfer.repository import ModelConfig, PreprocessConfig

from ..batcher import Batch
from ..decode_processes import ProcessDecoder
from ..gpu_decode import GpuJpegDecoder, GpuNormaliser
from ..prepare import is_jpeg
from ..reload import LoadedModel
from .base import Inputs, Preprocessing

__all__ = ["GpuDecode", "GpuNormalise", "GpuPreprocessing", "GpuTools", "ProcessDecoding"]

logger = logging.getLogger(__name__)

#: With decoding processes and --gpu-decode, batches of at most this many JPEGs decode on the GPU (latency).
GPU_DECODE_UP_TO = 4
_JPEG = "image/jpeg"


@dataclass(frozen=True)
class GpuTools:
    """What the GPU strategies build their tools with (tests without a GPU give stand-ins)."""

    normaliser: Callable[..., GpuNormaliser] = GpuNormaliser
    jpeg_decoder: Callable[..., GpuJpegDecoder] = GpuJpegDecoder
    processes: Callable[..., ProcessDecoder] = ProcessDecoder


class GpuPreprocessing(Preprocessing):
    """What the GPU strategies share: the tools per preprocessing config, the gpu-prep thread, `ahead`."""

    on_gpu = True

    def __init__(
        self, preprocess: PreprocessConfig, *, device: int | None, max_frames: int, tools: GpuTools
    ) -> None:
        self._device = device
        self._max_frames = max_frames
        self._tools = tools
        self._tools_lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-prep")
        self._normaliser = tools.normaliser(preprocess, device=device, max_frames=max_frames)

    def normaliser(self, preprocess: PreprocessConfig) -> GpuNormaliser:
        """The normaliser for `preprocess` (a new version may change it: built aside, then swapped)."""
        with self._tools_lock:
            if self._normaliser.config != preprocess:
                self._normaliser = self._tools.normaliser(
                    preprocess, device=self._device, max_frames=self._max_frames
                )
            return self._normaliser

    def wants_ahead(self, batch: Batch) -> bool:
        """Encoded images and pixels are made on the GPU; decoded tensors go as they are."""
        return bool(batch.encoded) or batch.pixels

    async def ahead(self, batch: Batch, config: ModelConfig) -> Batch:
        """Make the model input on the gpu-prep thread; on a bad image leave it to the run stage."""
        preprocess = config.preprocess
        if preprocess is None or not self.wants_ahead(batch):
            return batch
        loop = asyncio.get_running_loop()
        try:
            on_device = await loop.run_in_executor(self._thread, self.make, batch, preprocess)
        except RequestError as exc:
            logger.debug("making a batch ahead failed (%s); the run stage will split it", exc)
            return batch
        return batch.made_ahead(on_device, preprocess)

    def model_inputs(self, batch: Batch, loaded: LoadedModel) -> Inputs:
        """The batch's input on the GPU (made ahead with this version's preprocessing, or now)."""
        if not self.wants_ahead(batch):
            return batch.inputs
        preprocess = loaded.config.preprocess
        if preprocess is None:
            raise BackendError(
                "a batch of images was left for the GPU, but the serving version takes tensors"
            )
        if batch.on_device is not None and batch.prepared_for == preprocess:
            images = batch.on_device
        else:
            images = self.make(batch, preprocess)
        if not loaded.backend.accepts_device_tensors:  # e.g. a reload brought an onnxruntime version
            images = images.cpu().numpy()
        return {preprocess.input: images}

    def make(self, batch: Batch, preprocess: PreprocessConfig) -> Any:
        """The model input of an image or pixel batch, on the GPU (ready when this returns)."""
        if batch.pixels:
            [pixels] = batch.inputs.values()
            return self.normaliser(preprocess).from_pixels(pixels)
        return self.make_encoded(list(batch.encoded), preprocess)

    def make_encoded(self, images: list[bytes], preprocess: PreprocessConfig) -> Any:
        """The model input of a batch of encoded images."""
        raise BackendError(f"{self.name} leaves no image encoded")

    def close(self) -> None:
        """Stop the gpu-prep thread."""
        self._thread.shutdown(wait=False, cancel_futures=True)


class GpuNormalise(GpuPreprocessing):
    """Images decoded on the CPU threads into uint8 pixels (a quarter of FP32's bytes to copy),
    normalised on the GPU (`--gpu-normalise`)."""

    name = "gpu-normalise"
    pixels = True

    def keeps_encoded(self, content_type: str, data: bytes) -> bool:
        """Nothing stays encoded: the threads decode to pixels."""
        return False

    def decode_image(self, data: bytes, config: PreprocessConfig) -> Any:
        """Decode, crop and resize to uint8 pixels; the GPU does the rest."""
        return decode_pixels(data, config)

    def describe(self) -> str:
        """What decodes where."""
        return "images decoded on the CPU threads, normalised on the GPU"


class GpuDecode(GpuPreprocessing):
    """JPEGs decoded, resized and normalised on the GPU (nvJPEG through torchvision, or nvImageCodec);
    other images on the CPU threads (into pixels for the GPU with `--gpu-normalise` too)."""

    name = "gpu-decode"

    def __init__(
        self,
        preprocess: PreprocessConfig,
        *,
        device: int | None,
        max_frames: int,
        nvimgcodec: bool,
        normalise_others: bool,
        tools: GpuTools,
    ) -> None:
        # The decoder first: it says what --gpu-decode needs where torchvision or CUDA is missing.
        self._decoder = tools.jpeg_decoder(
            preprocess, device=device, max_frames=max_frames, nvimgcodec=nvimgcodec
        )
        super().__init__(preprocess, device=device, max_frames=max_frames, tools=tools)
        self._nvimgcodec = nvimgcodec
        self._normalise_others = normalise_others

    @property
    def pixels(self) -> bool:  # type: ignore[override]
        """PNGs and others become pixels for the GPU with --gpu-normalise, the model input otherwise."""
        return self._normalise_others

    def keeps_encoded(self, content_type: str, data: bytes) -> bool:
        """JPEGs stay encoded for the GPU decoder."""
        return content_type == _JPEG and is_jpeg(data)

    def decode_image(self, data: bytes, config: PreprocessConfig) -> Any:
        """A non-JPEG image on the CPU: pixels with --gpu-normalise, else the model input."""
        return decode_pixels(data, config) if self._normalise_others else super().decode_image(data, config)

    def decoder(self, preprocess: PreprocessConfig) -> GpuJpegDecoder:
        """The JPEG decoder for `preprocess` (rebuilt when a new version changes it)."""
        with self._tools_lock:
            if self._decoder.config != preprocess:
                self._decoder = self._tools.jpeg_decoder(
                    preprocess, device=self._device, max_frames=self._max_frames, nvimgcodec=self._nvimgcodec
                )
            return self._decoder

    def make_encoded(self, images: list[bytes], preprocess: PreprocessConfig) -> Any:
        """Decode the JPEGs on the GPU."""
        return self.decoder(preprocess).decode(images)

    def describe(self) -> str:
        """What decodes where."""
        others = "pixels normalised on the GPU" if self._normalise_others else "the CPU threads"
        return f"JPEGs decoded on the GPU ({self._decoder.library}), other images on {others}"


class ProcessDecoding(GpuPreprocessing):
    """Images decoded in spawned processes into one page-locked shared-memory block, copied to the GPU
    and normalised there (`--decode-processes N`); with `--gpu-decode` too, batches of up to
    `GPU_DECODE_UP_TO` JPEGs decode on the GPU instead (a lone request's latency, with the SMs idle)."""

    name = "decode-processes"

    def __init__(
        self,
        preprocess: PreprocessConfig,
        *,
        device: int | None,
        max_frames: int,
        processes: int,
        small_batches_on_gpu: GpuDecode | None,
        tools: GpuTools,
    ) -> None:
        super().__init__(preprocess, device=device, max_frames=max_frames, tools=tools)
        self._gpu_decode = small_batches_on_gpu
        self._processes = tools.processes(preprocess, processes=processes, max_frames=max_frames)
        self._pinned = self._normaliser.pin(self._processes.buffer)
        self._closed = False

    def keeps_encoded(self, content_type: str, data: bytes) -> bool:
        """Every image stays encoded for the decoding processes."""
        return True

    def make_encoded(self, images: list[bytes], preprocess: PreprocessConfig) -> Any:
        """Decode in the processes into shared memory (a few JPEGs on the GPU), normalise there."""
        if (
            self._gpu_decode is not None
            and len(images) <= GPU_DECODE_UP_TO
            and all(is_jpeg(image) for image in images)
        ):
            return self._gpu_decode.make_encoded(images, preprocess)
        normaliser = self.normaliser(preprocess)
        if self._processes.fits(len(images), preprocess):
            with self._processes.decode(images, preprocess) as shared:
                return normaliser.from_pixels(shared)
        # A reload raised max_batch or the image size past the shared block: decode here this time.
        return normaliser.from_pixels(np.concatenate([decode_pixels(image, preprocess) for image in images]))

    def describe(self) -> str:
        """What decodes where."""
        small = f"; up to {GPU_DECODE_UP_TO} JPEGs on the GPU" if self._gpu_decode is not None else ""
        processes, megabytes = self._processes.processes, self._processes.buffer.nbytes >> 20
        pinned = ", page-locked" if self._pinned else ""
        return (
            f"images decoded in {processes} processes into {megabytes} MB of shared memory{pinned}, "
            f"normalised on the GPU{small}"
        )

    def close(self) -> None:
        """Stop the processes and free the shared block (unpinned first). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        super().close()
        if self._gpu_decode is not None:
            self._gpu_decode.close()
        if self._pinned:
            self._normaliser.unpin(self._processes.buffer)
            self._pinned = False
        self._processes.close()
