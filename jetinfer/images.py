"""Images to model inputs: decode JPEG/PNG, crop, resize, normalise, lay out, as the model config says.

One piece of code for every place that prepares an image the way the model was trained to see it:
the worker (its decode threads and decoding processes; Pillow releases the GIL while decoding) and
the TensorRT builder's INT8 calibration. Never called on an event loop.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from jetinfer.errors import InvalidInputError, TooLargeError
from jetinfer.protocol import DATATYPES
from jetinfer.repository import PreprocessConfig

__all__ = ["MAX_IMAGE_PIXELS", "decode_pixels", "image_pixels", "normalise", "preprocess_image"]

MAX_IMAGE_PIXELS: Final = 64 * 1024 * 1024
_RESAMPLE: Final = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}


def _decode(data: bytes, config: PreprocessConfig) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise TooLargeError(f"image of {width}x{height} pixels is over {MAX_IMAGE_PIXELS}")
            if image.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the target is much smaller (DCT scaling).
                image.draft("RGB", (config.width, config.height))
            image.load()
    except TooLargeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise TooLargeError(f"image is too large to decode: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    return image


def decode_pixels(data: bytes, config: PreprocessConfig) -> npt.NDArray[np.uint8]:
    """One encoded image -> (1, H, W, 3) uint8 RGB, cropped and resized; `--gpu-normalise` does the rest."""
    return _pixels(data, config)[None]


def preprocess_image(data: bytes, config: PreprocessConfig) -> npt.NDArray[Any]:
    """One encoded image -> an array of shape (1, C, H, W) or (1, H, W, C) in the config's datatype."""
    return normalise(_pixels(data, config), config)[None]


def normalise(pixels: npt.NDArray[np.uint8], config: PreprocessConfig) -> npt.NDArray[Any]:
    """(H, W, 3) uint8 RGB -> the model's input for one frame: layout, datatype, (pixel - mean) / std."""
    if config.datatype == "UINT8":
        chosen = pixels.transpose(2, 0, 1) if config.layout == "NCHW" else pixels
        return np.ascontiguousarray(chosen)
    # (pixel - mean) / std as two in-place float32 passes straight into the output layout: cheaper than
    # a table gather per channel and no temporary arrays (docs/benchmarks.md).
    mean, std = _channel_constants(config.mean, config.std, config.layout)
    source = pixels.transpose(2, 0, 1) if config.layout == "NCHW" else pixels
    out = np.empty(source.shape, dtype=np.float32)
    np.subtract(source, mean, out=out)
    np.divide(out, std, out=out)
    return out if config.datatype == "FP32" else out.astype(DATATYPES[config.datatype])


def _pixels(data: bytes, config: PreprocessConfig) -> npt.NDArray[np.uint8]:
    """Decode, centre-crop and resize: (H, W, 3) uint8 RGB."""
    return image_pixels(_decode(data, config), config)


def image_pixels(image: Image.Image, config: PreprocessConfig) -> npt.NDArray[np.uint8]:
    """An opened image -> (H, W, 3) uint8 RGB: the central `center_crop` of each side, resized to
    width x height with the config's filter."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    if config.center_crop < 1.0:
        width, height = image.size
        crop_w, crop_h = round(width * config.center_crop), round(height * config.center_crop)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    if image.size != (config.width, config.height):
        image = image.resize((config.width, config.height), _RESAMPLE[config.resize])
    return np.asarray(image)


@functools.cache
def _channel_constants(
    mean: tuple[float, float, float], std: tuple[float, float, float], layout: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    shape = (3, 1, 1) if layout == "NCHW" else (3,)
    return np.array(mean, np.float32).reshape(shape), np.array(std, np.float32).reshape(shape)
