"""`--gpu-decode`: JPEGs decoded, resized and normalised on the GPU match the CPU path (issue 5)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer.errors import ModelLoadError
from jetinfer.repository import PreprocessConfig
from tests.conftest import NatsUnderTest, running_worker
from worker.preprocess import preprocess_image

CONFIG = PreprocessConfig(
    input="input", width=224, height=224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)
)


def _gpu_decoder_or_skip() -> Any:
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"torch with torchvision is not installed here ({exc}); --gpu-decode needs both")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: --gpu-decode needs one")
    from worker.gpu_decode import GpuJpegDecoder

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


async def test_gpu_decode_is_refused_at_start_where_it_cannot_work(
    nats_server: NatsUnderTest, model_repo: Any, tmp_path: Path
) -> None:
    try:
        import torch
        import torchvision.io  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU with torchvision is here: the refusal cannot be shown")
    except ImportError:
        pass
    repo, model = model_repo("efficientnet_lite0")
    with pytest.raises(ModelLoadError, match="--gpu-decode needs"):
        async with running_worker(nats_server.url, repo, [model], gpu_decode=True):
            pass
