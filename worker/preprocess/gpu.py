"""The strategies that make the model input on the GPU: normalise there, decode JPEGs there, or decode
in processes into shared memory and normalise there.

A strategy has `lanes`: each lane is a set of tools (its own CUDA stream, its own decoding processes)
that makes one batch at a time, so while the engine runs batch N, batches N+1 and N+2 are made ahead
in two lanes at once (`ahead`, on the lanes' threads). With the engine idle the run stage makes a batch
itself in a free lane (a lone request saves the hop). A batch that cannot be made ahead (a bad image)
is left to the run stage, whose splitting finds the request that fails. A new model version with other
preprocessing gets new tools, built in the lane that needs them, so a batch being made keeps its own.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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

__all__ = ["GPU_DECODE_UP_TO", "GpuDecode", "GpuNormalise", "GpuPreprocessing", "GpuTools", "ProcessDecoding"]

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


class _Lane:
    """The tools that make one batch at a time: a normaliser (its own stream), and where the strategy
    uses them a JPEG decoder and decoding processes (page-locked shared memory)."""

    def __init__(
        self,
        tools: GpuTools,
        preprocess: PreprocessConfig,
        device: int | None,
        max_frames: int,
        *,
        jpeg_decoder: bool = False,
        nvimgcodec: bool = False,
    ) -> None:
        self._tools = tools
        self._device = device
        self._max_frames = max_frames
        self._nvimgcodec = nvimgcodec
        # The decoder first: it says what --gpu-decode needs where torchvision or CUDA is missing.
        self._decoder: GpuJpegDecoder | None = (
            tools.jpeg_decoder(preprocess, device=device, max_frames=max_frames, nvimgcodec=nvimgcodec)
            if jpeg_decoder
            else None
        )
        self._normaliser = tools.normaliser(preprocess, device=device, max_frames=max_frames)
        self.processes: ProcessDecoder | None = None
        self.pinned = False

    def with_processes(self, processes: int) -> _Lane:
        """Give this lane `processes` decoding processes with a page-locked shared block."""
        self.processes = self._tools.processes(
            self._normaliser.config, processes=processes, max_frames=self._max_frames
        )
        self.pinned = self._normaliser.pin(self.processes.buffer)
        return self

    @property
    def library(self) -> str:
        """Which library decodes JPEGs on the GPU here."""
        return self._decoder.library if self._decoder is not None else "none"

    def normaliser(self, preprocess: PreprocessConfig) -> GpuNormaliser:
        """The normaliser for `preprocess` (rebuilt when a new version changes it)."""
        if self._normaliser.config != preprocess:
            self._normaliser = self._tools.normaliser(
                preprocess, device=self._device, max_frames=self._max_frames
            )
        return self._normaliser

    def decoder(self, preprocess: PreprocessConfig) -> GpuJpegDecoder:
        """The JPEG decoder for `preprocess` (rebuilt when a new version changes it)."""
        if self._decoder is None:
            raise BackendError("this lane has no GPU JPEG decoder")
        if self._decoder.config != preprocess:
            self._decoder = self._tools.jpeg_decoder(
                preprocess, device=self._device, max_frames=self._max_frames, nvimgcodec=self._nvimgcodec
            )
        return self._decoder

    def close(self) -> None:
        """Stop the processes and free the shared block (unpinned first)."""
        if self.processes is not None:
            if self.pinned:
                self._normaliser.unpin(self.processes.buffer)
                self.pinned = False
            self.processes.close()
            self.processes = None


class GpuPreprocessing(Preprocessing):
    """What the GPU strategies share: lanes of tools, their threads, `ahead`, `model_inputs`."""

    on_gpu = True

    def __init__(self, lanes: list[_Lane]) -> None:
        if not lanes:
            raise ValueError("a GPU strategy needs at least one lane")
        self._lanes = list(lanes)
        self._free: queue.Queue[_Lane] = queue.Queue()
        for lane in self._lanes:
            self._free.put(lane)
        self._threads = ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="gpu-prep")
        self._closed = False

    @property
    def lanes(self) -> int:
        """Batches made at once."""
        return len(self._lanes)

    def reserve(self, preprocess: PreprocessConfig, max_frames: int, batches: int) -> None:
        """Make `batches` model inputs of `max_frames` at once, in the lanes, and let them go: torch's
        caching allocator then holds as many full-size buffers as the pipeline keeps on the GPU, and
        GPU memory stays flat from the first request (else it grows by a buffer the first time that
        many batches are on the GPU together). A failure is logged; serving goes on."""
        pixels = np.zeros((max_frames, preprocess.height, preprocess.width, 3), np.uint8)
        held = []
        try:
            for index in range(batches):
                lane = self._lanes[index % len(self._lanes)]
                held.append(lane.normaliser(preprocess).from_pixels(pixels))
        except Exception as exc:
            logger.warning(
                "reserving GPU memory for %d batches failed: %s: %s", batches, type(exc).__name__, exc
            )
        finally:
            del held

    @contextmanager
    def _lane(self) -> Iterator[_Lane]:
        lane = self._free.get()
        try:
            yield lane
        finally:
            self._free.put(lane)

    def wants_ahead(self, batch: Batch) -> bool:
        """Encoded images and pixels are made on the GPU; decoded tensors go as they are."""
        return bool(batch.encoded) or batch.pixels

    async def ahead(self, batch: Batch, config: ModelConfig) -> Batch:
        """Make the model input in a lane; on any failure leave it to the run stage, which makes it
        again and settles what fails there (a bad image splits the batch; a GPU error is retryable)."""
        preprocess = config.preprocess
        if preprocess is None or not self.wants_ahead(batch):
            return batch
        loop = asyncio.get_running_loop()
        try:
            on_device = await loop.run_in_executor(self._threads, self.make, batch, preprocess)
        except RequestError as exc:
            logger.debug("making a batch ahead failed (%s); the run stage will split it", exc)
            return batch
        except Exception as exc:  # e.g. CUDA out of memory: not a reason to stop the pipeline
            logger.warning(
                "making a batch of %d ahead failed (%s: %s); the run stage will make it",
                len(batch.requests),
                type(exc).__name__,
                exc,
            )
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
        """The model input of an image or pixel batch on the GPU, made in a free lane (ready on return)."""
        with self._lane() as lane:
            if batch.pixels:
                [pixels] = batch.inputs.values()
                return lane.normaliser(preprocess).from_pixels(pixels)
            return self.make_encoded(lane, list(batch.encoded), preprocess)

    def make_encoded(self, lane: _Lane, images: list[bytes], preprocess: PreprocessConfig) -> Any:
        """The model input of a batch of encoded images."""
        raise BackendError(f"{self.name} leaves no image encoded")

    def close(self) -> None:
        """Stop the lanes' threads and processes. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        for lane in self._lanes:
            lane.close()


class GpuNormalise(GpuPreprocessing):
    """Images decoded on the CPU threads into uint8 pixels (a quarter of FP32's bytes to copy),
    normalised on the GPU (`--gpu-normalise`)."""

    name = "gpu-normalise"
    pixels = True

    def __init__(
        self,
        preprocess: PreprocessConfig,
        *,
        device: int | None,
        max_frames: int,
        tools: GpuTools,
        lanes: int = 1,
    ) -> None:
        super().__init__([_Lane(tools, preprocess, device, max_frames) for _ in range(lanes)])

    def keeps_encoded(self, content_type: str, data: bytes) -> bool:
        """Nothing stays encoded: the threads decode to pixels."""
        return False

    def decode_image(self, data: bytes, config: PreprocessConfig) -> Any:
        """Decode, crop and resize to uint8 pixels; the GPU does the rest."""
        return decode_pixels(data, config)

    def describe(self) -> str:
        """What decodes where."""
        return f"images decoded on the CPU threads, normalised on the GPU in {self.lanes} lane(s)"


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
        lanes: int = 1,
    ) -> None:
        made = [
            _Lane(tools, preprocess, device, max_frames, jpeg_decoder=True, nvimgcodec=nvimgcodec)
            for _ in range(lanes)
        ]
        super().__init__(made)
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

    def make_encoded(self, lane: _Lane, images: list[bytes], preprocess: PreprocessConfig) -> Any:
        """Decode the JPEGs on the GPU."""
        return lane.decoder(preprocess).decode(images)

    def describe(self) -> str:
        """What decodes where."""
        others = "pixels normalised on the GPU" if self._normalise_others else "the CPU threads"
        where = f"{self._lanes[0].library}, {self.lanes} lane(s)"
        return f"JPEGs decoded on the GPU ({where}), other images on {others}"


class ProcessDecoding(GpuPreprocessing):
    """Images decoded in spawned processes into page-locked shared memory, copied to the GPU and
    normalised there (`--decode-processes N`, shared among the lanes); with `--gpu-decode` too, batches
    of up to `GPU_DECODE_UP_TO` JPEGs decode on the GPU instead (a lone request's latency), and
    `gpu_lanes` more lanes decode whole JPEG batches on the GPU beside the processes' lanes (where the
    CPU's decoding cannot keep up with the engine: a batch goes to whichever lane is free), on the
    hardware JPEG engine with `gpu_lanes_nvimgcodec` where nvImageCodec finds one."""

    name = "decode-processes"

    def __init__(
        self,
        preprocess: PreprocessConfig,
        *,
        device: int | None,
        max_frames: int,
        processes: int,
        small_batches_on_gpu: bool,
        nvimgcodec: bool,
        tools: GpuTools,
        lanes: int = 1,
        gpu_lanes: int = 0,
        gpu_lanes_nvimgcodec: bool = False,
    ) -> None:
        lanes = max(1, min(lanes, processes))
        shares = [processes // lanes + (1 if i < processes % lanes else 0) for i in range(lanes)]
        made: list[_Lane] = []
        try:
            for share in shares:
                lane = _Lane(
                    tools,
                    preprocess,
                    device,
                    max_frames,
                    jpeg_decoder=small_batches_on_gpu,
                    nvimgcodec=nvimgcodec,
                )
                made.append(lane)
                lane.with_processes(share)
            for _ in range(gpu_lanes):
                made.append(
                    _Lane(
                        tools,
                        preprocess,
                        device,
                        max_frames,
                        jpeg_decoder=True,
                        nvimgcodec=gpu_lanes_nvimgcodec,
                    )
                )
        except BaseException:
            for lane in made:
                lane.close()
            raise
        super().__init__(made)
        self._processes = processes
        self._small_on_gpu = small_batches_on_gpu

    def keeps_encoded(self, content_type: str, data: bytes) -> bool:
        """Every image stays encoded for the decoding processes."""
        return True

    def make_encoded(self, lane: _Lane, images: list[bytes], preprocess: PreprocessConfig) -> Any:
        """Decode in the lane's processes into shared memory (a few JPEGs on the GPU), normalise there."""
        jpegs = all(is_jpeg(image) for image in images)
        if jpegs and (lane.processes is None or (self._small_on_gpu and len(images) <= GPU_DECODE_UP_TO)):
            return lane.decoder(preprocess).decode(images)
        normaliser = lane.normaliser(preprocess)
        if lane.processes is not None and lane.processes.fits(len(images), preprocess):
            with lane.processes.decode(images, preprocess) as shared:
                return normaliser.from_pixels(shared)
        # A GPU lane's PNGs, or a reload raised max_batch or the image size past the shared block: here.
        return normaliser.from_pixels(np.concatenate([decode_pixels(image, preprocess) for image in images]))

    def describe(self) -> str:
        """What decodes where."""
        small = f"; up to {GPU_DECODE_UP_TO} JPEGs on the GPU" if self._small_on_gpu else ""
        process_lanes = [lane for lane in self._lanes if lane.processes is not None]
        pinned = ", page-locked" if all(lane.pinned for lane in process_lanes) else ""
        gpu_lanes = [lane for lane in self._lanes if lane.processes is None]
        beside = (
            f"; {len(gpu_lanes)} more lane(s) decoding JPEG batches on the GPU ({gpu_lanes[0].library})"
            if gpu_lanes
            else ""
        )
        return (
            f"images decoded in {self._processes} processes ({len(process_lanes)} lane(s)) into shared "
            f"memory{pinned}, normalised on the GPU{small}{beside}"
        )
