"""The same worker with FastStream 0.7.8 (NATS broker, JetStream pull subscriber in batch mode).

    .peers/faststream/bin/python bench/peers/faststream_worker.py --nats-url URL --repository DIR

FastStream declares the stream INFER and the durable pull consumer `worker-<model>` with jetinfer's
settings, fetches batches of up to the model's max_batch (collecting for at most `--batch-timeout-s`),
decodes with Pillow in a thread pool, runs ONNX Runtime in a thread, publishes one jetinfer-format reply
per request to `Jetinfer-Reply-To`; FastStream acks the batch after the handler returns. Runs from its own
venv (bench/peers/setup.sh): FastStream 0.7.8 needs nats-py 2.14.0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import numpy as np
from faststream import FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.annotations import NatsMessage
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType
from onnx_peer import load_model, preprocess


def build(url: str, repository: Path, model: str, batch_timeout_s: float) -> FastStream:
    """The FastStream app: one batch subscriber on `infer.<model>`."""
    config, version, session, pre, output = load_model(repository, model)
    decoders, engine = ThreadPoolExecutor(os.cpu_count() or 1), ThreadPoolExecutor(1)

    broker = NatsBroker(url)
    stream = JStream(
        "INFER",
        subjects=[f"infer.{model}"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msg_size=8 * 1024 * 1024,
        duplicate_window=120.0,
    )

    @broker.subscriber(
        f"infer.{model}",
        stream=stream,
        durable=f"worker-{model}",
        config=ConsumerConfig(ack_wait=30.0, max_deliver=5, max_ack_pending=4096),
        pull_sub=PullSub(batch_size=config["max_batch"], timeout=batch_timeout_s, batch=True),
    )
    async def handle(bodies: list[bytes], message: NatsMessage) -> None:
        loop = asyncio.get_running_loop()
        frames = await asyncio.gather(*(loop.run_in_executor(decoders, preprocess, b, pre) for b in bodies))
        start = time.time()
        (logits,) = await loop.run_in_executor(
            engine, session.run, [output], {pre["input"]: np.stack(frames)}
        )
        infer_ms = (time.time() - start) * 1000
        for raw, headers, row in zip(message.raw_message, message.batch_headers, logits, strict=True):
            stored = raw.metadata.timestamp.timestamp()
            reply = {
                "id": headers.get("Nats-Msg-Id", ""),
                "model_name": model,
                "model_version": str(version),
                "outputs": [
                    {"name": output, "datatype": "FP32", "shape": [1, *row.shape], "data": row.tobytes()}
                ],
                "timing": {
                    "queue_ms": (start - stored) * 1000,
                    "infer_ms": infer_ms,
                    "total_ms": (time.time() - stored) * 1000,
                },
            }
            if "Jetinfer-Reply-To" in headers:
                await broker.publish(
                    msgpack.packb(reply),
                    subject=headers["Jetinfer-Reply-To"],
                    headers={"Jetinfer-Status": "ok"},
                )

    return FastStream(broker)


def main() -> None:
    """Parse the flags and run the app until SIGTERM."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch-timeout-s", type=float, default=0.01, help="longest wait to fill a batch")
    args = parser.parse_args()
    asyncio.run(build(args.nats_url, args.repository, args.model, args.batch_timeout_s).run())


if __name__ == "__main__":
    main()
