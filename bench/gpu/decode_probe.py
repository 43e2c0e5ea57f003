"""Time `--gpu-decode`'s JPEG decoders on this GPU: torchvision's nvJPEG and nvImageCodec (hardware engine).

    python bench/gpu/decode_probe.py [--batch 128] [--seconds 3]

Decodes, resizes and normalises batches of the cat photo (224x224 JPEG) with `GpuJpegDecoder`, once
with JETINFER_NVIMGCODEC=0 (torchvision) and once with it on; prints images/s for each and which
library served. Also checks the two agree on the pixels.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np

from jetinfer.repository import PreprocessConfig
from worker.gpu_decode import GpuJpegDecoder

CONFIG = PreprocessConfig(
    input="input", width=224, height=224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)
)


def cat_jpeg() -> bytes:
    """The cat photo at 224x224, JPEG quality 90 (what `jetinfer bench` sends)."""
    import skimage.data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize((224, 224)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    """Print one line per decoder, then their agreement."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    images = [cat_jpeg()] * args.batch
    outputs = {}
    for flag in ("0", "1"):
        os.environ["JETINFER_NVIMGCODEC"] = flag
        decoder = GpuJpegDecoder(CONFIG)
        decoder.decode(images)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            out = decoder.decode(images)
            done += len(images)
        rate = done / (time.perf_counter() - started)
        outputs[decoder.library] = out.cpu().numpy()
        print(f"JETINFER_NVIMGCODEC={flag}: {decoder.library}: {rate:,.0f} images/s at batch {args.batch}")
    if len(outputs) == 2:
        first, second = outputs.values()
        print(
            f"mean |difference| of the two decoders: {np.abs(first - second).mean():.4f} (normalised units)"
        )


if __name__ == "__main__":
    main()
