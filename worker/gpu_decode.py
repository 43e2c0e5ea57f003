"""JPEG requests decoded on the GPU (`--gpu-decode`): nvJPEG through torchvision, resize and normalise there.

CPU decoding is what limits a GPU worker first (about 1k images/s per worker process on the H100
machine: the decode threads share one GIL with the event loop). With this on, JPEG requests skip
the CPU and reach the engine as a batch already on the device; PNG and tensor requests still go
through the CPU path. Needs torch with CUDA and torchvision's GPU decoder; the worker refuses the
setting at start where they are missing.

`--gpu-normalise` is the other split: images decode on the CPU threads (Pillow releases the GIL while
it decodes) into uint8 pixels, and only the normalisation runs on the GPU, which keeps its time for the
model. nvJPEG's decoding costs GPU time: about 20k images/s of 224x224 on the H100.

nvImageCodec drives the JPEG engines that A100/H100/H200-class GPUs have beside their SMs (NVJPG):
decoding there takes no SM time from the model and no CPU time from the decoding processes, so the
worker's plan puts the lanes that decode whole JPEG batches on the GPU there where it finds them
(`hardware_jpeg_rate`, measured at start).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy.typing as npt

from jetinfer.errors import BackendError, InvalidInputError, ModelLoadError
from jetinfer.repository import PreprocessConfig

from .backends.torch_buckets import wait_for

__all__ = ["GpuJpegDecoder", "GpuNormaliser", "hardware_jpeg_rate"]

logger = logging.getLogger(__name__)


class GpuNormaliser:
    """Turns uint8 RGB pixels into the model's input on a GPU: layout, float, (x - mean) / std.

    `--gpu-normalise` feeds it pixels decoded on CPU threads ((N, H, W, 3) uint8: a quarter of the
    bytes of FP32 to copy); `GpuJpegDecoder` feeds it what nvJPEG decoded.
    """

    def __init__(
        self, config: PreprocessConfig, *, device: int | None = None, max_frames: int | None = None
    ) -> None:
        try:
            import torch
        except ImportError as exc:
            raise ModelLoadError(f"GPU preprocessing needs torch: {exc}") from exc
        if not torch.cuda.is_available():
            raise ModelLoadError("GPU preprocessing needs a CUDA GPU; none is visible")
        self._torch = torch
        self.config = config
        self.max_frames = max_frames
        self.device = torch.device("cuda", device if device is not None else torch.cuda.current_device())
        # Its own stream: preprocessing the next batch overlaps the model running the current one. Of
        # normal priority: a higher one slowed the engine beside an nvJPEG lane by 12% (docs/benchmarks.md).
        cuda: Any = torch.cuda  # torch.cuda.Stream has no annotations
        self.stream = cuda.Stream(device=self.device)
        self._mean = torch.tensor(config.mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(config.std, device=self.device, dtype=torch.float32).view(
            1, 3, 1, 1
        )

    def normalise(self, batch: Any) -> Any:
        """(N, 3, H, W) uint8 or float CUDA tensor -> the model's input (float32 normalised, or uint8)."""
        torch, config = self._torch, self.config
        if config.datatype == "UINT8":
            batch = batch if batch.dtype == torch.uint8 else batch.round().clamp(0, 255).to(torch.uint8)
        else:
            out = self.empty(batch.shape, torch.float32)
            out.copy_(batch)
            batch = out.sub_(self._mean).mul_(self._inv_std)
        if config.layout == "NHWC":
            batch = batch.permute(0, 2, 3, 1).contiguous()
        return batch

    def empty(self, shape: Any, dtype: Any) -> Any:
        """An uninitialised tensor of `shape`, cut from one of `max_frames` frames (or a power of two).

        Batches come in every size from 1 to max_batch; allocating each size exactly leaves torch's
        caching allocator holding a block per size seen, and even power-of-two sizes let it split big
        blocks for small batches and then grow for the next big one (measured on the H100: +300 to
        +650 MiB in 15 s with two workers). One size per dtype reuses the same few blocks forever.
        """
        frames = int(shape[0])
        if self.max_frames is not None and frames <= self.max_frames:
            bucket = self.max_frames
        else:
            bucket = 1 << max(0, frames - 1).bit_length()
        return self._torch.empty((bucket, *shape[1:]), dtype=dtype, device=self.device)[:frames]

    def pin(self, host: npt.NDArray[Any]) -> bool:
        """Page-lock `host` (cudaHostRegister) so copies from it are direct DMA; False where CUDA refuses.

        Call `unpin` before the memory is freed.
        """
        cuda: Any = self._torch.cuda  # cudart() has no annotations
        error = int(cuda.cudart().cudaHostRegister(host.ctypes.data, host.nbytes, 0))
        if error != 0:
            logger.info("could not page-lock %d bytes for GPU copies (cudaError %d)", host.nbytes, error)
        return error == 0

    def unpin(self, host: npt.NDArray[Any]) -> None:
        """Undo `pin`."""
        cuda: Any = self._torch.cuda
        cuda.cudart().cudaHostUnregister(host.ctypes.data)

    def from_pixels(self, pixels: npt.NDArray[Any]) -> Any:
        """Host (N, H, W, 3) uint8 pixels -> the model's input on the GPU, ready when this returns."""
        torch = self._torch
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream), torch.inference_mode():
                # Pillow's arrays are read-only, and a one-image batch is one of them: torch warns on those.
                host = pixels if pixels.flags.writeable else pixels.copy()
                # Asynchronous from page-locked memory (the shared block of --decode-processes), a plain
                # copy otherwise; either way the stream is synchronised before this returns.
                source = torch.from_numpy(host)
                on_gpu = self.empty(source.shape, torch.uint8)  # a pooled bucket, not a new size per batch
                on_gpu.copy_(source, non_blocking=True)
                batch = self.normalise(on_gpu.permute(0, 3, 1, 2))
                wait_for(torch, self.stream, len(pixels))
                return batch
        except Exception as exc:
            raise BackendError(f"GPU preprocessing failed: {type(exc).__name__}: {exc}") from exc


class GpuJpegDecoder:
    """Decodes a list of JPEGs into one normalised (N, C, H, W) or (N, H, W, C) tensor on a GPU."""

    def __init__(
        self,
        config: PreprocessConfig,
        *,
        device: int | None = None,
        max_frames: int | None = None,
        nvimgcodec: bool = False,
    ) -> None:
        try:
            import torch
            import torch.nn.functional as functional
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError as exc:
            raise ModelLoadError(f"--gpu-decode needs torch and torchvision: {exc}") from exc
        self._normaliser = GpuNormaliser(config, device=device, max_frames=max_frames)  # checks for a GPU
        self._torch = torch
        self._functional = functional
        self._decode_jpeg = decode_jpeg
        self._mode = ImageReadMode.RGB
        self.config = config
        self.device = self._normaliser.device
        self._nvimgcodec: Any = None
        self._nvdecoder: Any = None  # nvImageCodec's decoder, where it loads and passes a self-test
        #: Whether JPEGs decode on the GPU's hardware JPEG engine (nvImageCodec), not on its SMs.
        self.hardware = False
        self.library = "torchvision"
        if nvimgcodec:
            self._nvdecoder = self._load_nvimgcodec()

    def _load_nvimgcodec(self) -> Any:
        """nvImageCodec's decoder, preferring the GPU's hardware JPEG engine; None where it cannot work.

        nvJPEG through torchvision decodes on the SMs the model needs; A100/H100/H200-class GPUs also
        have JPEG engines of their own (NVJPG), which nvImageCodec (`pip install
        nvidia-nvimgcodec-cu13 nvidia-nvjpeg`) can drive. A decoder of the hardware backend alone must
        decode a test image, else the GPU's CUDA backend is tried (it takes SM time like torchvision's).
        """
        try:
            _preload_nvjpeg()
            from nvidia import nvimgcodec  # type: ignore[import-not-found, unused-ignore]
        except Exception as exc:  # not installed, or its libraries do not load here
            logger.info("nvImageCodec not used (%s: %s); decoding with torchvision", type(exc).__name__, exc)
            return None
        probe = _probe_jpeg()
        for kinds, hardware in ((("HW_GPU_ONLY",), True), (("GPU_ONLY",), False)):
            try:
                backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind)) for kind in kinds]
                decoder = nvimgcodec.Decoder(device_id=self.device.index, backends=backends)
                [image] = decoder.decode(
                    [nvimgcodec.CodeStream(probe)], cuda_stream=self._normaliser.stream.cuda_stream
                )
                if image is None or tuple(self._torch.as_tensor(image, device=self.device).shape) != (
                    64,
                    64,
                    3,
                ):
                    raise RuntimeError("its self-test decoded nothing, or the wrong shape")
            except Exception as exc:  # no such backend, or a decoder that does not work on this GPU
                logger.info("nvImageCodec's %s backend not used (%s: %s)", kinds[0], type(exc).__name__, exc)
                continue
            if hardware:
                # The CUDA backend behind it, for the JPEGs the engine cannot take (progressive ones).
                kinds_all = [nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY]
                decoder = nvimgcodec.Decoder(
                    device_id=self.device.index, backends=[nvimgcodec.Backend(k) for k in kinds_all]
                )
            self._nvimgcodec = nvimgcodec
            self.hardware = hardware
            engine = "the hardware JPEG engine" if hardware else "CUDA"
            self.library = f"nvImageCodec {getattr(nvimgcodec, '__version__', '?')} ({engine})"
            return decoder
        logger.info("nvImageCodec decodes nothing on this GPU; decoding with torchvision")
        return None

    def _decode_raw(self, images: list[bytes]) -> list[Any]:
        """Decode to uint8 (3, H, W) CUDA tensors, on the preprocessing stream."""
        torch = self._torch
        stream = self._normaliser.stream
        if self._nvdecoder is not None:
            codec = self._nvimgcodec
            decoded = self._nvdecoder.decode(
                [codec.CodeStream(image) for image in images], cuda_stream=stream.cuda_stream
            )
            if any(image is None for image in decoded):
                raise InvalidInputError("cannot decode a JPEG on the GPU (nvImageCodec gave no image)")
            # Interleaved RGB (H, W, 3) in nvImageCodec's memory: a view, kept alive by `decoded` until
            # the batch is stacked and the stream synchronised.
            return [torch.as_tensor(image, device=self.device).permute(2, 0, 1) for image in decoded]
        data = [torch.frombuffer(bytearray(image), dtype=torch.uint8) for image in images]
        return list(self._decode_jpeg(data, mode=self._mode, device=self.device))

    def decode(self, images: list[bytes]) -> Any:
        """Decode, resize and normalise `images` on the GPU; returns a float32 (or uint8) CUDA tensor."""
        torch, config = self._torch, self.config
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self._normaliser.stream):
                decoded = self._decode_raw(images)
        except RuntimeError as exc:
            raise InvalidInputError(f"cannot decode a JPEG on the GPU: {exc}") from exc
        try:
            with (
                torch.cuda.device(self.device),
                torch.cuda.stream(self._normaliser.stream),
                torch.inference_mode(),
            ):
                frames = []
                size = (config.height, config.width)
                for image in decoded:
                    if config.center_crop < 1.0:
                        height, width = image.shape[-2:]
                        crop_h, crop_w = round(height * config.center_crop), round(width * config.center_crop)
                        top, left = (height - crop_h) // 2, (width - crop_w) // 2
                        image = image[:, top : top + crop_h, left : left + crop_w]
                    if tuple(image.shape[-2:]) != size:
                        image = self._functional.interpolate(
                            image[None].float(),
                            size=size,
                            mode=config.resize,
                            align_corners=False if config.resize != "nearest" else None,
                            antialias=config.resize != "nearest",
                        )[0]
                    frames.append(image)
                # One stack and one conversion for the batch, not a kernel per frame.
                if all(f.dtype == frames[0].dtype and f.shape == frames[0].shape for f in frames):
                    batch = torch.stack(
                        frames, out=self._normaliser.empty((len(frames), *frames[0].shape), frames[0].dtype)
                    )
                else:
                    batch = torch.stack([f.float() for f in frames])
                batch = self._normaliser.normalise(batch)
                wait_for(torch, self._normaliser.stream, len(images))
                return batch
        except Exception as exc:
            raise BackendError(f"GPU preprocessing failed: {type(exc).__name__}: {exc}") from exc


def hardware_jpeg_rate(
    config: PreprocessConfig, jpeg: bytes, *, frames: int, device: int | None = None
) -> float | None:
    """Images/s of the GPU's hardware JPEG engine (nvImageCodec) making model inputs of `frames` copies of
    `jpeg` (decode, resize, normalise: best of three); None where there is none to use. Blocking."""
    import time

    try:
        decoder = GpuJpegDecoder(config, device=device, max_frames=frames, nvimgcodec=True)
    except ModelLoadError as exc:  # no CUDA, torch or torchvision
        logger.info("no hardware JPEG decoding: %s", exc)
        return None
    if not decoder.hardware:
        return None
    images = [jpeg] * frames
    try:
        decoder.decode(images)  # warm-up: the engine's first batch allocates
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            decoder.decode(images)
            best = min(best, time.perf_counter() - started)
    except (BackendError, InvalidInputError) as exc:
        logger.info("the hardware JPEG engine failed its timing (%s); not used", exc)
        return None
    return frames / max(best, 1e-9)


def _probe_jpeg() -> bytes:
    """A 64x64 baseline JPEG, for a decoder's self-test (the hardware engine refuses tiny images)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 90)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _preload_nvjpeg() -> None:
    """Load libnvjpeg from the `nvidia-nvjpeg` wheel, where it is installed, so nvImageCodec's nvJPEG
    extension finds it without LD_LIBRARY_PATH (it looks the library up by name)."""
    import ctypes
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("nvidia.nvjpeg")
    except ModuleNotFoundError:  # no `nvidia` namespace at all
        return
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        for library in sorted(Path(root).glob("lib*/libnvjpeg.so*")):
            try:
                ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
                return
            except OSError as exc:
                logger.debug("could not load %s: %s", library, exc)
