"""`--gpu-decode`: JPEGs decoded, resized and normalised on the GPU match the CPU path (issue 5)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer.errors import ModelLoadError
from jetinfer.images import decode_pixels, preprocess_image
from jetinfer.repository import ModelConfig, PreprocessConfig, TensorSpec
from tests.conftest import NatsUnderTest, running_worker

CONFIG = PreprocessConfig(
    input="input", width=224, height=224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)
)


def _image_model() -> ModelConfig:
    """A classifier taking 224x224 JPEGs, for the request-preparation tests."""
    return ModelConfig(
        name="m",
        max_batch=8,
        inputs=(TensorSpec("input", "FP32", (3, 224, 224)),),
        outputs=(TensorSpec("output", "FP32", (1000,)),),
        preprocess=CONFIG,
    )


def _gpu_decoder_or_skip() -> Any:
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"torch with torchvision is not installed here ({exc}); --gpu-decode needs both")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: --gpu-decode needs one")
    from jetinfer.worker.gpu_decode import GpuJpegDecoder

    return GpuJpegDecoder(CONFIG)


@pytest.mark.gpu
def test_gpu_decode_matches_the_cpu_path(cat_jpeg: bytes) -> None:
    from PIL import Image

    decoder = _gpu_decoder_or_skip()
    photo = Image.open(io.BytesIO(cat_jpeg))
    same_size = io.BytesIO()
    photo.resize((224, 224)).save(same_size, format="JPEG", quality=95)
    images = [same_size.getvalue(), cat_jpeg]  # one needs no resize, one is 451x300
    batch = decoder.decode(images).cpu().numpy()
    assert batch.shape == (2, 3, 224, 224)
    cpu = np.concatenate([preprocess_image(image, CONFIG) for image in images])
    # Decoders (nvJPEG vs libjpeg-turbo) and resize kernels differ by a few grey levels, not more.
    assert np.abs(batch[0] - cpu[0]).mean() < 0.05
    assert np.abs(batch[1] - cpu[1]).mean() < 0.15


@pytest.mark.gpu
def test_the_hardware_jpeg_engine_matches_the_cpu_path(cat_jpeg: bytes) -> None:
    _gpu_decoder_or_skip()
    from jetinfer.worker.gpu_decode import GpuJpegDecoder, hardware_jpeg_rate

    decoder = GpuJpegDecoder(CONFIG, nvimgcodec=True)
    if not decoder.hardware:
        pytest.skip(f"no hardware JPEG engine through nvImageCodec here (decoding with {decoder.library})")
    images = [cat_jpeg] * 3
    batch = decoder.decode(images).cpu().numpy()
    cpu = np.concatenate([preprocess_image(image, CONFIG) for image in images])
    assert batch.shape == cpu.shape
    assert np.abs(batch - cpu).mean() < 0.15
    rate = hardware_jpeg_rate(CONFIG, cat_jpeg, frames=32)
    assert rate is not None
    assert rate > 0


@pytest.mark.parametrize(
    ("setting", "message"),
    [("gpu_decode", "--gpu-decode needs"), ("gpu_normalise", "GPU preprocessing needs")],
)
async def test_gpu_preprocessing_is_refused_at_start_where_it_cannot_work(
    nats_server: NatsUnderTest, model_repo: Any, setting: str, message: str
) -> None:
    try:
        import torch

        if torch.cuda.is_available() and (setting == "gpu_normalise" or _has_torchvision()):
            pytest.skip("a CUDA GPU (with torchvision) is here: the refusal cannot be shown")
    except ImportError:
        pass
    repo, model = model_repo("efficientnet_lite0")
    with pytest.raises(ModelLoadError, match=message):
        async with running_worker(nats_server.url, repo, [model], **{setting: True}):
            pass


def _has_torchvision() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_gpu_normalise_matches_the_cpu_path(cat_jpeg: bytes, layout: str) -> None:
    """`--gpu-normalise`: pixels decoded on the CPU, normalised on the GPU, equal the CPU path's output."""
    try:
        import torch
    except ImportError as exc:
        pytest.skip(f"torch is not installed here ({exc}); --gpu-normalise needs it")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: --gpu-normalise needs one")
    from jetinfer.worker.gpu_decode import GpuNormaliser

    config = dataclasses.replace(CONFIG, layout=layout)  # type: ignore[arg-type]
    pixels = np.concatenate([decode_pixels(cat_jpeg, config)] * 3)
    assert pixels.shape == (3, 224, 224, 3)
    assert pixels.dtype == np.uint8
    on_gpu = GpuNormaliser(config).from_pixels(pixels).cpu().numpy()
    cpu = np.concatenate([preprocess_image(cat_jpeg, config)] * 3)
    assert on_gpu.shape == cpu.shape
    np.testing.assert_allclose(on_gpu, cpu, atol=1e-5)


class NoGpu:
    """A stand-in for GpuNormaliser where the test uses only the CPU half of a GPU strategy."""

    def __init__(self, config: PreprocessConfig, **_: Any) -> None:
        self.config = config

    def pin(self, host: Any) -> bool:
        return False


def test_images_for_gpu_normalise_are_pixels_in_their_own_batches(cat_jpeg: bytes) -> None:
    """The CPU half of `--gpu-normalise`: uint8 pixels, one frame, never batched with tensor requests."""
    from nats.aio.msg import Msg

    from jetinfer.protocol import Limits, request_headers
    from jetinfer.worker.batcher import make_batches
    from jetinfer.worker.prepare import prepare_request
    from jetinfer.worker.preprocess import CpuDecoding, GpuNormalise, GpuTools

    config = _image_model()
    assert config.preprocess is not None
    strategy = GpuNormalise(config.preprocess, device=None, max_frames=8, tools=GpuTools(normaliser=NoGpu))
    ack = "$JS.ACK.INFER.worker-m.1.{0}.{0}.1732490000000000000.0"
    msgs = [
        Msg(
            _client=None,  # type: ignore[arg-type]
            subject="infer.m",
            reply=ack.format(i),
            data=cat_jpeg,
            headers=request_headers(f"r{i}", "_INBOX.x", content_type="image/jpeg"),
        )
        for i in range(3)
    ]
    limits = Limits()
    prepared = [prepare_request(m, config, max_batch=8, limits=limits) for m in msgs]
    for request in prepared:
        strategy.decode_request(request, config)
    assert [r.error for r in prepared] == [None, None, None]
    assert all(r.pixels and r.frames == 1 for r in prepared)
    assert prepared[0].inputs["input"].shape == (1, 224, 224, 3)
    plain = prepare_request(msgs[0], config, max_batch=8, limits=limits)
    CpuDecoding().decode_request(plain, config)
    assert not plain.pixels
    assert plain.inputs["input"].shape == (1, 3, 224, 224)
    batches = make_batches([*prepared, plain], 8)
    assert sorted((b.pixels, b.frames) for b in batches) == [(False, 1), (True, 3)]
    assert next(b for b in batches if b.pixels).inputs["input"].shape == (3, 224, 224, 3)


def test_a_jpeg_left_for_the_gpu_still_needs_an_id(cat_jpeg: bytes) -> None:
    from nats.aio.msg import Msg

    from jetinfer.protocol import Limits
    from jetinfer.worker.prepare import prepare_request

    config = _image_model()
    msg = Msg(
        _client=None,  # type: ignore[arg-type]
        subject="infer.m",
        reply="$JS.ACK.INFER.worker-m.1.7.7.1732490000000000000.0",
        data=cat_jpeg,
        headers={"Content-Type": "image/jpeg", "Jetinfer-Reply-To": "_INBOX.x"},
    )
    request = prepare_request(msg, config, max_batch=8, limits=Limits())
    assert request.request_id == "seq-7"
    assert request.error is not None
    assert "Nats-Msg-Id" in request.error.message


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mode",
    [
        {"gpu_decode": True},
        {"gpu_normalise": True},
        {"gpu_normalise": True, "decode_processes": 2},
        {"gpu_decode": True, "gpu_normalise": True, "decode_processes": 2},
    ],
    ids=["gpu-decode", "gpu-normalise", "decode-processes", "both"],
)
async def test_a_worker_preprocessing_on_the_gpu_classifies_the_cat_and_isolates_a_bad_jpeg(
    nats_server: NatsUnderTest, cat_jpeg: bytes, tmp_path: Path, mode: dict[str, Any]
) -> None:
    """The whole path on a GPU: batches decoded ahead on their own stream, a torch fp16 EfficientNet-Lite0,
    one corrupt JPEG among 40 good ones answered `invalid_input` while the others get the cat."""
    _gpu_decoder_or_skip()
    from jetinfer.errors import InvalidInputError
    from jetinfer.producer.client import Client
    from tests.conftest import CAT_CLASSES, run_cli

    repo = tmp_path / "repo"
    built = run_cli("build", "efficientnet_lite0", "--backend", "torch", "--fp16", "--repository", str(repo))
    if built.returncode != 0:
        pytest.skip(f"cannot build the torch EfficientNet-Lite0 here: {built.stderr[-300:]}")
    corrupt = cat_jpeg[:600] + bytes(range(256)) * 8  # a JPEG header, then garbage
    async with (
        running_worker(nats_server.url, repo, ["efficientnet_lite0"], **mode) as worker,
        Client(nats_server.url) as client,
    ):
        results = await asyncio.gather(
            *(client.infer("efficientnet_lite0", cat_jpeg, timeout=60) for _ in range(20)),
            client.infer("efficientnet_lite0", corrupt, timeout=60),
            *(client.infer("efficientnet_lite0", cat_jpeg, timeout=60) for _ in range(20)),
            return_exceptions=True,
        )
        batches = worker.servers["efficientnet_lite0"].batches_run
        # One at a time, as at idle: batches of one (with "both", those go to nvJPEG, not the processes).
        lone = await client.infer("efficientnet_lite0", cat_jpeg, timeout=60)
        assert int(lone.output()[0].argmax()) in CAT_CLASSES
        with pytest.raises(InvalidInputError):
            await client.infer("efficientnet_lite0", corrupt, timeout=60)
    bad = results.pop(20)
    assert isinstance(bad, InvalidInputError), bad
    for reply in results:
        assert not isinstance(reply, BaseException), reply
        assert int(reply.output()[0].argmax()) in CAT_CLASSES
    assert batches < 41
