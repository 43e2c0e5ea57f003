"""Image preprocessing: decode, resize, normalise and lay out exactly as the model config says."""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jetinfer.errors import InvalidInputError, TooLargeError
from jetinfer.images import decode_pixels, preprocess_image, to_rgb
from jetinfer.repository import PreprocessConfig

CONFIG = PreprocessConfig(input="input", width=64, height=48, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def reference(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """The textbook computation in float64, for comparison."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((config.width, config.height), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64)
    out = (pixels - np.array(config.mean)) / np.array(config.std)
    return (out.transpose(2, 0, 1) if config.layout == "NCHW" else out)[None]


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("datatype", ["FP32", "FP16"])
def test_normalisation_matches_the_textbook(photo: Image.Image, layout: str, datatype: str) -> None:
    config = dataclasses.replace(CONFIG, layout=layout, datatype=datatype)  # type: ignore[arg-type]
    data = encode(photo, "PNG")
    out = preprocess_image(data, config)
    expected = reference(data, config)
    assert out.shape == expected.shape
    assert out.dtype == (np.float32 if datatype == "FP32" else np.float16)
    tolerance = 1e-6 if datatype == "FP32" else 2e-2
    np.testing.assert_allclose(out.astype(np.float64), expected, atol=tolerance, rtol=tolerance)


def test_uint8_keeps_pixels(photo: Image.Image) -> None:
    config = dataclasses.replace(CONFIG, datatype="UINT8")
    out = preprocess_image(encode(photo, "PNG"), config)
    expected = np.asarray(photo.resize((64, 48), Image.BILINEAR)).transpose(2, 0, 1)[None]
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_rgba_and_grey_become_rgb(photo: Image.Image) -> None:
    for mode in ("RGBA", "L"):
        out = preprocess_image(encode(photo.convert(mode), "PNG"), CONFIG)
        assert out.shape == (1, 3, 48, 64)


def test_center_crop_takes_the_middle() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[25:75, 25:75] = 255
    config = dataclasses.replace(CONFIG, width=50, height=50, mean=(0, 0, 0), std=(1, 1, 1), center_crop=0.5)
    out = preprocess_image(encode(Image.fromarray(image), "PNG"), config)
    assert out.min() == 255.0


def test_corrupt_and_huge_images_are_refused(photo: Image.Image) -> None:
    with pytest.raises(InvalidInputError, match="cannot decode"):
        preprocess_image(encode(photo, "JPEG")[:200], CONFIG)
    with pytest.raises(InvalidInputError):
        preprocess_image(b"not an image at all", CONFIG)
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 M pixels in a few KB
    with pytest.raises(TooLargeError, match="pixels"):
        preprocess_image(bomb, CONFIG)


# -- every image mode: converted faithfully, or refused naming the mode (issue 15) -----------------------

RNG = np.random.default_rng(15)
SOURCE = RNG.integers(0, 256, (40, 70, 3), dtype=np.uint8)  # the 8-bit RGB pixels every case holds
GREY = RNG.integers(0, 256, (40, 70), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (40, 70), dtype=np.uint8)


def png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count) written by hand: Pillow cannot."""
    height, width, channels = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def palette_case(transparency: bool, fmt: str = "PNG") -> tuple[bytes, np.ndarray]:
    image = Image.fromarray(SOURCE).quantize(colors=32)
    palette = np.array(image.getpalette()[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
    expected = palette[np.asarray(image)]  # the palette lookup, done here rather than by Pillow
    if fmt == "TIFF":  # PA: palette plus an alpha band
        pa = image.convert("PA")
        return encode(pa, "TIFF"), expected
    return (encode(image, fmt, transparency=0) if transparency else encode(image, fmt)), expected


def cmyk_case() -> tuple[bytes, np.ndarray]:
    cmyk = np.concatenate([255 - SOURCE, np.zeros((40, 70, 1), np.uint8)], axis=2)
    return encode(Image.frombytes("CMYK", (70, 40), cmyk.tobytes()), "TIFF"), SOURCE


def la_case() -> tuple[bytes, np.ndarray]:
    la = Image.frombytes("LA", (70, 40), np.stack([GREY, ALPHA], axis=2).tobytes())
    return encode(la, "PNG"), grey_rgb(GREY)


def rgba_case() -> tuple[bytes, np.ndarray]:
    return encode(Image.fromarray(np.concatenate([SOURCE, ALPHA[:, :, None]], axis=2)), "PNG"), SOURCE


def bilevel_case() -> tuple[bytes, np.ndarray]:
    bits = GREY > 127
    return encode(Image.fromarray(bits), "PNG"), grey_rgb(np.where(bits, 255, 0).astype(np.uint8))


def tiff_of(mode: str, values: np.ndarray) -> bytes:
    return encode(Image.frombytes(mode, (values.shape[1], values.shape[0]), values.tobytes()), "TIFF")


# (opened mode, encoded image, the same pixels as 8-bit RGB); 16-bit values are v * 257, floats v / 255,
# so the 8-bit value each stands for is exact.
FAITHFUL = {
    "1": lambda: ("1", *bilevel_case()),
    "L": lambda: ("L", encode(Image.fromarray(GREY), "PNG"), grey_rgb(GREY)),
    "LA": lambda: ("LA", *la_case()),
    "P": lambda: ("P", *palette_case(False)),
    "P-transparency": lambda: ("P", *palette_case(True)),
    "P-gif": lambda: ("P", *palette_case(False, "GIF")),
    "PA": lambda: ("PA", *palette_case(False, "TIFF")),
    "RGB": lambda: ("RGB", encode(Image.fromarray(SOURCE), "PNG"), SOURCE),
    "RGBA": lambda: ("RGBA", *rgba_case()),
    "CMYK": lambda: ("CMYK", *cmyk_case()),
    "I;16": lambda: ("I;16", encode(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"), grey_rgb(GREY)),
    "I;16B": lambda: (
        "I;16B",
        tiff_of("I;16B", (GREY.astype(np.uint16) * 257).astype(">u2")),
        grey_rgb(GREY),
    ),
    "I": lambda: ("I", tiff_of("I", GREY.astype(np.int32) * 257), grey_rgb(GREY)),
    "F": lambda: ("F", tiff_of("F", GREY.astype(np.float32) / 255), grey_rgb(GREY)),
    "RGB-16bit": lambda: ("RGB", png_16bit(SOURCE.astype(np.uint16) * 257), SOURCE),
    "RGBA-16bit": lambda: (
        "RGBA",
        png_16bit(np.concatenate([SOURCE, ALPHA[:, :, None]], axis=2).astype(np.uint16) * 257),
        SOURCE,
    ),
    "LA-16bit": lambda: (
        "RGBA",  # Pillow opens 16-bit grey+alpha as 8-bit RGBA
        png_16bit(np.stack([GREY, ALPHA], axis=2).astype(np.uint16) * 257),
        grey_rgb(GREY),
    ),
}


@pytest.mark.parametrize("case", sorted(FAITHFUL))
def test_each_image_mode_gives_the_pixels_of_the_same_image_sent_as_8_bit_rgb(case: str) -> None:
    mode, data, same_pixels = FAITHFUL[case]()
    assert Image.open(io.BytesIO(data)).mode == mode  # the case really holds that mode
    reference = encode(Image.fromarray(same_pixels), "PNG")
    for config in (CONFIG, dataclasses.replace(CONFIG, datatype="UINT8", layout="NHWC")):
        np.testing.assert_array_equal(preprocess_image(data, config), preprocess_image(reference, config))


def test_ycbcr_is_converted_within_rounding() -> None:
    data = encode(Image.fromarray(SOURCE).convert("YCbCr"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "YCbCr"
    pixels = decode_pixels(data, dataclasses.replace(CONFIG, width=70, height=40)).astype(int)
    assert np.abs(pixels[0] - SOURCE.astype(int)).max() <= 4  # YCbCr holds 8-bit values of other axes


REFUSED = {
    "I above 16 bits": (lambda: tiff_of("I", np.full((4, 4), 70_000, np.int32)), "image mode I holds"),
    "I negative": (lambda: tiff_of("I", np.full((4, 4), -5, np.int32)), "image mode I holds"),
    "F above 1": (lambda: tiff_of("F", np.full((4, 4), 2.5, np.float32)), "image mode F holds 2.5"),
    "F not finite": (lambda: tiff_of("F", np.array([[0.5, np.nan]], np.float32)), "NaN or infinity"),
    "LAB": (lambda: encode(Image.fromarray(SOURCE).convert("LAB"), "TIFF"), "image mode LAB"),
    "TGA": (lambda: encode(Image.fromarray(SOURCE), "TGA"), "not one of the formats"),
    "EPS header": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not one of the formats"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_images_that_cannot_be_converted_faithfully_are_refused_naming_why(case: str) -> None:
    make, message = REFUSED[case]
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        preprocess_image(make(), CONFIG)


def test_plain_rgb_images_are_not_copied_on_their_way_to_the_resize() -> None:
    image = Image.open(io.BytesIO(encode(Image.fromarray(SOURCE), "JPEG")))
    assert image.mode == "RGB"
    assert to_rgb(image) is image
