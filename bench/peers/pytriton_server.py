"""Triton Inference Server through PyTriton: the same model, JPEG bytes in, decoded server-side.

    .peers/pytriton/bin/python bench/peers/pytriton_server.py --repository DIR --http-port 8000

One Triton model `<model>` with a BYTES input `image` (shape [1] per request: one encoded JPEG) and an
FP32 output named as in config.json; Triton's dynamic batcher forms batches of up to the model's
max_batch, and the Python function decodes them with Pillow in a thread pool and runs ONNX Runtime.
Runs under Debian's /usr/bin/python3 (bench/peers/setup.sh): Triton's Python backend needs a shared
libpython. SIGTERM or SIGINT stops the server.
"""

from __future__ import annotations

import argparse
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import numpy as np
from onnx_peer import load_model, preprocess
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # Triton.serve() stops cleanly on it


def main() -> None:
    """Load the model, bind it into Triton and serve until SIGTERM."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batcher's wait")
    args = parser.parse_args()

    config, version, session, pre, output = load_model(args.repository, args.model)
    decoders = ThreadPoolExecutor(os.cpu_count() or 1)

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        frames = list(decoders.map(lambda row: preprocess(bytes(row[0]), pre), image))
        (logits,) = session.run([output], {pre["input"]: np.stack(frames)})
        return {output: logits}

    signal.signal(signal.SIGTERM, _interrupt)
    triton_config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
    )
    # PyTriton guards the statistics API with a generated token by default; the benchmark reads the batch
    # sizes Triton ran from it, so it stays open (on loopback); the other default restrictions stay.
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    with Triton(config=triton_config, security_config=security) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name=output, dtype=np.float32, shape=tuple(config["outputs"][0]["shape"]))],
            model_version=version,
            config=ModelConfig(
                max_batch_size=config["max_batch"],
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
