"""Several encoded images in one message (a BYTES input, the Open Inference Protocol's): N frames, answered
as N rows in order, exactly as N single-image requests are; bad ones refused with a typed error."""

from __future__ import annotations

import io
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from PIL import Image

from jetinfer.errors import InvalidInputError, TooLargeError
from jetinfer.producer.client import Client, encode_payload
from jetinfer.protocol import Limits, Tensor, decode_request
from tests.conftest import NatsUnderTest, running_worker


def png_of(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).rotate(90).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bytes_tensors_round_trip_and_malformed_ones_are_refused() -> None:
    images = [b"\xff\xd8\xffa", b"\x89PNG\r\n\x1a\nb", b"\xff\xd8\xffcc"]
    body, content_type = encode_payload("r1", images)
    assert content_type == "application/msgpack"
    [tensor] = decode_request(body).inputs
    assert (tensor.datatype, tensor.shape, tensor.elements()) == ("BYTES", (3,), images)
    good = Tensor.from_bytes("images", images).data
    for data, shape, complaint in (
        (good[:-1], [3], "past the (data.s )?end"),
        (good + b"x", [3], "after its 3 elements"),
        (good, [2, 2], "one dimension"),
        (struct.pack("<I", 5), [2], "past the (data.s )?end"),
    ):
        raw = msgpack.packb(
            {"id": "r", "inputs": [{"name": "images", "datatype": "BYTES", "shape": shape, "data": data}]}
        )
        with pytest.raises(InvalidInputError, match=complaint):
            decode_request(raw, limits=Limits())
    with pytest.raises(InvalidInputError, match="JPEG or PNG"):
        encode_payload("r2", [b"not an image"])


async def test_many_images_in_one_message_are_answered_as_many_single_ones(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    images = [cat_jpeg, png_of(cat_jpeg), cat_jpeg]
    async with running_worker(nats_server.url, repo, [model]), Client(nats_server.url) as client:
        together = await client.infer(model, images, timeout=60)
        alone = [await client.infer(model, image, timeout=60) for image in images]
    logits = together.output("logits")
    assert logits.shape == (3, 1000)
    for row, single in zip(logits, alone, strict=True):
        np.testing.assert_allclose(row, single.output("logits")[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(logits[0], logits[1], atol=1e-3)  # the rotated PNG is another picture


async def test_bad_image_messages_get_typed_errors(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes
) -> None:
    image_repo, image_model = model_repo("efficientnet_lite0")
    tensor_repo, tensor_model = model_repo("identity")
    async with (
        running_worker(nats_server.url, image_repo, [image_model], max_batch=4),
        running_worker(nats_server.url, tensor_repo, [tensor_model]),
        Client(nats_server.url) as client,
    ):
        with pytest.raises(TooLargeError, match="5 images"):
            await client.infer(image_model, [cat_jpeg] * 5, timeout=60)
        with pytest.raises(InvalidInputError, match="takes tensors"):
            await client.infer(tensor_model, [cat_jpeg], timeout=60)
        with pytest.raises(InvalidInputError, match="cannot decode image"):
            await client.infer(image_model, [cat_jpeg, cat_jpeg[: len(cat_jpeg) // 3]], timeout=60)
