"""Image preprocessing: decode, resize, normalise and lay out exactly as the model config says."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from jetinfer.errors import InvalidInputError, TooLargeError
from jetinfer.images import preprocess_image
from jetinfer.repository import PreprocessConfig

CONFIG = PreprocessConfig(input="input", width=64, height=48, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
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
