"""`--decode-processes`: images decoded in a pool of processes into shared memory (issue 5).

The GPU half (the shared block copied to the GPU and normalised there) is in test_gpu_decode.py;
these tests need only the CPU.
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jetinfer.errors import BackendError, InvalidInputError, TooLargeError
from jetinfer.images import decode_pixels
from jetinfer.repository import PreprocessConfig
from jetinfer.worker.decode_processes import ProcessDecoder

CONFIG = PreprocessConfig(input="input", width=64, height=48, center_crop=0.875)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def images() -> list[bytes]:
    """Eleven photos of different sizes, JPEG and PNG, one of them greyscale."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(10):
        pixels = rng.integers(0, 256, (40 + 7 * i, 90 - 3 * i, 3), dtype=np.uint8)
        out.append(_encode(pixels, "JPEG" if i % 3 else "PNG"))
    out.append(_encode(rng.integers(0, 256, (50, 50), dtype=np.uint8), "JPEG"))
    return out


@pytest.fixture
def decoder() -> Iterator[ProcessDecoder]:
    pool = ProcessDecoder(CONFIG, processes=2, max_frames=16, slots=1)
    yield pool
    pool.close()


def test_processes_decode_exactly_what_the_decode_threads_do(
    decoder: ProcessDecoder, images: list[bytes]
) -> None:
    expected = np.concatenate([decode_pixels(image, CONFIG) for image in images])
    for _ in range(2):  # the one slot is handed back and used again
        with decoder.decode(images, CONFIG) as pixels:
            assert pixels.shape == (11, 48, 64, 3)
            assert pixels.dtype == np.uint8
            np.testing.assert_array_equal(pixels, expected)
    with decoder.decode(images[:1], CONFIG) as pixels:  # a lone image: one task, one process
        np.testing.assert_array_equal(pixels, expected[:1])


def test_images_past_the_shared_arena_travel_through_the_pipe() -> None:
    """Each slot holds 64 KB of encoded image per frame; bigger images go by pipe, decoded the same."""
    rng = np.random.default_rng(9)
    big = [_encode(rng.integers(0, 256, (200, 230, 3), dtype=np.uint8), "PNG") for _ in range(4)]
    assert sum(map(len, big)) > 4 * 64 * 1024  # the arena of a four-frame slot
    decoder = ProcessDecoder(CONFIG, processes=2, max_frames=4)
    try:
        with decoder.decode(big, CONFIG) as pixels:
            np.testing.assert_array_equal(pixels, np.concatenate([decode_pixels(b, CONFIG) for b in big]))
    finally:
        decoder.close()


def test_a_bad_image_is_named_and_its_slot_is_given_back(
    decoder: ProcessDecoder, images: list[bytes]
) -> None:
    batch = [*images[:6], images[6][:40] + b"garbage" * 20, *images[7:]]
    with (
        pytest.raises(InvalidInputError, match="image 6 of the batch: cannot decode image"),
        decoder.decode(batch, CONFIG),
    ):
        pass
    with decoder.decode(images[:3], CONFIG) as pixels:  # the only slot came back
        assert pixels.shape[0] == 3
    with (
        pytest.raises(InvalidInputError, match="image 1 of the batch"),
        decoder.decode([images[0], b"not an image"], CONFIG),
    ):
        pass  # two images are decoded in this thread, with the same errors


def test_a_batch_over_the_shared_block_is_refused(decoder: ProcessDecoder, images: list[bytes]) -> None:
    bigger = dataclasses.replace(CONFIG, width=640, height=480)
    assert decoder.fits(16, CONFIG)
    assert not decoder.fits(17, CONFIG)
    assert not decoder.fits(1, bigger)
    with pytest.raises(BackendError, match="do not fit a decoding slot"), decoder.decode(images[:1], bigger):
        pass


def test_a_decoding_process_that_dies_is_replaced(decoder: ProcessDecoder, images: list[bytes]) -> None:
    """A crash (out of memory, a decoder library bug) fails the batch as retryable, not the worker."""
    children = multiprocessing.active_children()
    assert len(children) == 2
    os.kill(children[0].pid or 0, signal.SIGKILL)
    children[0].join(10)
    with pytest.raises(BackendError, match="decoding process died or hung"), decoder.decode(images, CONFIG):
        pass
    with decoder.decode(images, CONFIG) as pixels:
        np.testing.assert_array_equal(pixels[:1], decode_pixels(images[0], CONFIG))


def test_a_decoding_process_that_hangs_is_replaced(images: list[bytes]) -> None:
    """No answer within the timeout: the batch fails as retryable and fresh processes take over."""
    decoder = ProcessDecoder(CONFIG, processes=1, max_frames=16, timeout_s=0.0)
    try:
        before = multiprocessing.active_children()
        with pytest.raises(BackendError, match="no answer within 0 s"), decoder.decode(images, CONFIG):
            pass
        after = multiprocessing.active_children()
        assert len(after) == 1
        assert after[0].pid != before[0].pid
        decoder.timeout_s = 30.0
        with decoder.decode(images, CONFIG) as pixels:
            np.testing.assert_array_equal(pixels[-1:], decode_pixels(images[-1], CONFIG))
    finally:
        decoder.close()


def test_close_stops_the_processes_and_frees_the_shared_memory(images: list[bytes]) -> None:
    decoder = ProcessDecoder(CONFIG, processes=2, max_frames=4)
    name = decoder._shm.name  # the block's name is the only way to look for it
    assert Path("/dev/shm", name.lstrip("/")).exists()
    decoder.close()
    assert not Path("/dev/shm", name.lstrip("/")).exists()
    assert multiprocessing.active_children() == []


def test_images_left_for_the_decoding_processes_stay_encoded(images: list[bytes]) -> None:
    """Prepare only checks an image's size: JPEG and PNG stay bytes, in one batch (for the processes)."""
    from nats.aio.msg import Msg

    from jetinfer.protocol import Limits, request_headers
    from jetinfer.repository import ModelConfig, TensorSpec
    from jetinfer.worker.batcher import make_batches
    from jetinfer.worker.prepare import prepare_request

    config = ModelConfig(
        name="m",
        max_batch=8,
        inputs=(TensorSpec("input", "FP32", (3, 48, 64)),),
        outputs=(TensorSpec("output", "FP32", (10,)),),
        preprocess=CONFIG,
    )
    ack = "$JS.ACK.INFER.worker-m.1.{0}.{0}.1732490000000000000.0"
    prepared = [
        prepare_request(
            Msg(
                _client=None,  # type: ignore[arg-type]
                subject="infer.m",
                reply=ack.format(i),
                data=image,
                headers=request_headers(f"r{i}", "_INBOX.x", content_type=kind),
            ),
            config,
            max_batch=8,
            limits=Limits(max_bytes=1 << 16),
        )
        for i, (image, kind) in enumerate([(images[1], "image/jpeg"), (images[0], "image/png")])
    ]
    assert [r.error for r in prepared] == [None, None]
    assert [r.encoded for r in prepared] == [(images[1],), (images[0],)]
    [batch] = make_batches(prepared, 8)
    assert batch.encoded == (images[1], images[0])
    oversized = prepare_request(prepared[0].msg, config, max_batch=8, limits=Limits(max_bytes=100))
    assert isinstance(oversized.error, TooLargeError)
