"""Images to model inputs: decode JPEG/PNG, crop, resize, normalise, lay out, as the model config says.

One piece of code for every place that prepares an image the way the model was trained to see it:
the worker (its decode threads and decoding processes; Pillow releases the GIL while decoding) and
the TensorRT builder's INT8 calibration. Never called on an event loop.

Every image becomes 8-bit RGB before it is cropped and resized, and only where that is faithful:

| Pillow mode | becomes |
| --- | --- |
| `RGB` | itself (the fast path of plain JPEGs) |
| `1`, `L`, `P`, `RGBX`, `CMYK`, `YCbCr` | RGB, Pillow's conversion |
| `LA`, `PA`, `RGBA`, `P` with transparency | RGB, alpha dropped (the colour under it stays) |
| `I;16`, `I;16L`, `I;16B`, `I;16N` (16-bit grey) | the high byte of each value, as grey RGB |
| `I` (32-bit integers) holding 0..65535 | read as 16-bit grey, as above |
| `F` (32-bit float) holding 0.0..1.0 | `round(value * 255)`, as grey RGB |

16-bit RGB and RGBA PNGs open as `RGB`/`RGBA` with the high byte already taken by Pillow, which is
the same scaling. Anything else (`LAB`, `HSV`, `I` outside 0..65535, `F` outside 0.0..1.0 or not
finite, modes a future Pillow adds) is refused with `invalid_input` naming the mode: never clipped,
never guessed. Only the formats in `IMAGE_FORMATS` are opened, whatever the Content-Type says.
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

__all__ = [
    "IMAGE_FORMATS",
    "MAX_IMAGE_PIXELS",
    "decode_pixels",
    "image_pixels",
    "normalise",
    "preprocess_image",
    "to_rgb",
]

MAX_IMAGE_PIXELS: Final = 64 * 1024 * 1024
#: Formats Pillow may open: JPEG (multi-picture JPEGs from cameras open as MPO) and PNG, which requests
#: declare, and the few formats a mislabelled image commonly is. Never EPS (Pillow runs Ghostscript
#: for it) nor any other of Pillow's plugins.
IMAGE_FORMATS: Final = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_CONVERTED_MODES: Final = frozenset({"1", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr"})
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_RESAMPLE: Final = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
}


def _decode(data: bytes, config: PreprocessConfig) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise TooLargeError(f"image of {width}x{height} pixels is over {MAX_IMAGE_PIXELS}")
            if image.format in ("JPEG", "MPO"):
                # Let libjpeg decode at a reduced scale when the target is much smaller (DCT scaling).
                image.draft("RGB", (config.width, config.height))
            image.load()
    except TooLargeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise TooLargeError(f"image is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"cannot decode image: not one of the formats {', '.join(IMAGE_FORMATS)}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
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
    image = to_rgb(image)
    if config.center_crop < 1.0:
        width, height = image.size
        crop_w, crop_h = round(width * config.center_crop), round(height * config.center_crop)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    if image.size != (config.width, config.height):
        image = image.resize((config.width, config.height), _RESAMPLE[config.resize])
    return np.asarray(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB, faithfully (see the module's table), or InvalidInputError."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _CONVERTED_MODES:
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        grey = _sixteen_bit_grey(image)
    elif mode == "F":
        grey = _unit_float_grey(image)
    else:
        raise InvalidInputError(
            f"image mode {mode} is not supported: send 8-bit or 16-bit grey, RGB, RGBA, palette or CMYK"
        )
    return Image.fromarray(grey).convert("RGB")


def _sixteen_bit_grey(image: Image.Image) -> npt.NDArray[np.uint8]:
    """16-bit grey (`I;16*`, or `I` in 0..65535) -> 8 bits: the high byte (Pillow does so for 16-bit RGB)."""
    values = np.asarray(image)
    if image.mode == "I" and values.size:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise InvalidInputError(
                f"image mode I holds values {low}..{high}: only 16-bit integer images (0..65535) are taken"
            )
    grey: npt.NDArray[np.uint8] = np.right_shift(values, 8).astype(np.uint8)
    return grey


def _unit_float_grey(image: Image.Image) -> npt.NDArray[np.uint8]:
    """Float grey (`F`) within 0.0..1.0 -> round(value * 255)."""
    values = np.asarray(image, dtype=np.float32)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
        finite = values[np.isfinite(values)]
        shown = f"{finite.min():g}..{finite.max():g}" if finite.size else "no finite values"
        raise InvalidInputError(
            f"image mode F holds {shown}{'' if finite.size == values.size else ' and NaN or infinity'}: "
            "float images must hold 0.0..1.0"
        )
    grey: npt.NDArray[np.uint8] = np.rint(values * 255.0).astype(np.uint8)
    return grey


@functools.cache
def _channel_constants(
    mean: tuple[float, float, float], std: tuple[float, float, float], layout: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    shape = (3, 1, 1) if layout == "NCHW" else (3,)
    return np.array(mean, np.float32).reshape(shape), np.array(std, np.float32).reshape(shape)
