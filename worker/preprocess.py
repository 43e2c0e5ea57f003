"""Image requests to model inputs: decode JPEG/PNG, resize, normalise, lay out, as the model config says.

Runs in the decode thread pool (Pillow releases the GIL while decoding), never on the event loop.
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

__all__ = ["MAX_IMAGE_PIXELS", "preprocess_image"]

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
    return image.convert("RGB") if image.mode != "RGB" else image


def preprocess_image(data: bytes, config: PreprocessConfig) -> npt.NDArray[Any]:
    """One encoded image -> an array of shape (1, C, H, W) or (1, H, W, C) in the config's datatype."""
    image = _decode(data, config)
    if config.center_crop < 1.0:
        width, height = image.size
        crop_w, crop_h = round(width * config.center_crop), round(height * config.center_crop)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    if image.size != (config.width, config.height):
        image = image.resize((config.width, config.height), _RESAMPLE[config.resize])
    pixels = np.asarray(image)
    if config.datatype == "UINT8":
        chosen = pixels.transpose(2, 0, 1) if config.layout == "NCHW" else pixels
        return np.ascontiguousarray(chosen[None])
    # (pixel - mean) / std through a 256-entry table per channel: one gather instead of three passes.
    table = _normalisation_table(config.mean, config.std, config.datatype)
    height, width = pixels.shape[:2]
    if config.layout == "NCHW":
        out = np.empty((1, 3, height, width), dtype=table.dtype)
        for channel in range(3):
            np.take(table[channel], pixels[:, :, channel], out=out[0, channel])
    else:
        out = np.empty((1, height, width, 3), dtype=table.dtype)
        for channel in range(3):
            np.take(table[channel], pixels[:, :, channel], out=out[0, :, :, channel])
    return out


@functools.cache
def _normalisation_table(
    mean: tuple[float, float, float], std: tuple[float, float, float], datatype: str
) -> npt.NDArray[Any]:
    levels = np.arange(256, dtype=np.float64)
    table = np.stack([(levels - m) / s for m, s in zip(mean, std, strict=True)])
    return table.astype(DATATYPES[datatype])
