"""JPEG requests decoded on the GPU (`--gpu-decode`): nvJPEG through torchvision, resize and normalise there.

CPU decoding is what limits a GPU worker first (about 1k images/s per worker process on the H100
machine: the decode threads share one GIL with the event loop). With this on, JPEG requests skip
the CPU and reach the engine as a batch already on the device; PNG and tensor requests still go
through the CPU path. Needs torch with CUDA and torchvision's GPU decoder; the worker refuses the
setting at start where they are missing.

`--gpu-normalise` is the other split: images decode on the CPU threads (Pillow releases the GIL while
it decodes) into uint8 pixels, and only the normalisation runs on the GPU, which keeps its time for the
model. nvJPEG's decoding costs GPU time: about 20k images/s of 224x224 on the H100.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy.typing as npt

from jetinfer.errors import BackendError, InvalidInputError, ModelLoadError
from jetinfer.repository import PreprocessConfig

__all__ = ["GpuJpegDecoder", "GpuNormaliser"]

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
        # Its own stream: preprocessing the next batch overlaps the model running the current one.
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
                torch.cuda.current_stream(self.device).synchronize()
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
        self._hardware: Any = None  # nvImageCodec's decoder, where it loads and passes a self-test
        self.library = "torchvision"
        # Opt-in (--nvimgcodec): on the H100 no faster end to end than torchvision, and its memory grew.
        if nvimgcodec:
            self._hardware = self._load_nvimgcodec()

    def _load_nvimgcodec(self) -> Any:
        """nvImageCodec's decoder, preferring the GPU's hardware JPEG engine; None where it cannot work.

        nvJPEG through torchvision decodes on the SMs the model needs; A100/H100-class GPUs also have a
        JPEG engine of their own, which nvImageCodec (`pip install nvidia-nvimgcodec-cu13`) can drive.
        `--nvimgcodec` turns it on (docs/benchmarks.md has what it measured).
        """
        try:
            from nvidia import nvimgcodec  # type: ignore[import-not-found, unused-ignore]

            kinds = [getattr(nvimgcodec.BackendKind, k, None) for k in ("HW_GPU_ONLY", "GPU_ONLY")]
            backends = [nvimgcodec.Backend(kind) for kind in kinds if kind is not None]
            decoder = nvimgcodec.Decoder(device_id=self.device.index, backends=backends)
            probe = _probe_jpeg()
            [image] = decoder.decode(
                [nvimgcodec.CodeStream(probe)], cuda_stream=self._normaliser.stream.cuda_stream
            )
            if image is None or tuple(self._torch.as_tensor(image, device=self.device).shape) != (16, 16, 3):
                raise RuntimeError("its self-test decoded nothing, or the wrong shape")
        except Exception as exc:  # not installed, no GPU backend, or a decoder that does not work here
            logger.info(
                "--gpu-decode: nvImageCodec not used (%s: %s); decoding with torchvision",
                type(exc).__name__,
                exc,
            )
            return None
        self._nvimgcodec = nvimgcodec
        self.library = f"nvImageCodec {getattr(nvimgcodec, '__version__', '?')}"
        logger.info("--gpu-decode: decoding with %s (hardware JPEG engine first)", self.library)
        return decoder

    def _decode_raw(self, images: list[bytes]) -> list[Any]:
        """Decode to uint8 (3, H, W) CUDA tensors, on the preprocessing stream."""
        torch = self._torch
        stream = self._normaliser.stream
        if self._hardware is not None:
            codec = self._nvimgcodec
            decoded = self._hardware.decode(
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
                torch.cuda.current_stream(self.device).synchronize()
                return batch
        except Exception as exc:
            raise BackendError(f"GPU preprocessing failed: {type(exc).__name__}: {exc}") from exc


def _probe_jpeg() -> bytes:
    """A 16x16 JPEG, for a decoder's self-test."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
