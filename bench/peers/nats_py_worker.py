"""A plain nats-py worker, as a competent user would write it: the peer jetinfer is compared with.

    python bench/peers/nats_py_worker.py --nats-url URL --repository DIR --model efficientnet_lite0

Pulls what one fetch returns from the durable consumer `worker-<model>` on stream INFER (created or
attached to as jetinfer does), decodes the JPEGs with Pillow in a thread pool, runs the batch through
ONNX Runtime in a thread, publishes one jetinfer-format reply per request to `Jetinfer-Reply-To`, acks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import nats
import numpy as np
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from onnx_peer import load_model, preprocess


async def serve(url: str, repository: Path, model: str) -> None:
    """Create or attach to INFER and `worker-<model>`, then fetch, decode, infer, reply, ack until SIGTERM."""
    config, version, session, pre, output = load_model(repository, model)
    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = f"infer.{model}"
    try:
        stream = (await js.stream_info("INFER")).config
        if subject not in (stream.subjects or []):
            stream.subjects = [*(stream.subjects or []), subject]
            await js.update_stream(config=stream)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name="INFER",
                subjects=[subject],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                max_msg_size=8 * 1024 * 1024,
                duplicate_window=120.0,
            )
        )
    consumer = ConsumerConfig(
        durable_name=f"worker-{model}",
        filter_subject=subject,
        ack_wait=30.0,
        ack_policy=AckPolicy.EXPLICIT,
        max_deliver=5,
        max_ack_pending=4096,
    )
    await js.add_consumer("INFER", config=consumer)
    sub = await js.pull_subscribe_bind(f"worker-{model}", stream="INFER")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    decoders, engine = ThreadPoolExecutor(os.cpu_count() or 1), ThreadPoolExecutor(1)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(config["max_batch"], timeout=1.0)
        except TimeoutError:  # nothing queued (nats-py 2.16 raises the builtin one here)
            continue
        if not msgs:
            continue
        frames = await asyncio.gather(
            *(loop.run_in_executor(decoders, preprocess, m.data, pre) for m in msgs)
        )
        start = time.time()
        (logits,) = await loop.run_in_executor(
            engine, session.run, [output], {pre["input"]: np.stack(frames)}
        )
        infer_ms = (time.time() - start) * 1000
        for msg, row in zip(msgs, logits, strict=True):
            headers = msg.headers or {}
            queue_ms = (start - msg.metadata.timestamp.timestamp()) * 1000
            reply = {
                "id": headers.get("Nats-Msg-Id", ""),
                "model_name": model,
                "model_version": str(version),
                "outputs": [
                    {
                        "name": output,
                        "datatype": "FP32",
                        "shape": [1, *row.shape],
                        "data": row.astype("<f4").tobytes(),
                    }
                ],
                "timing": {
                    "queue_ms": queue_ms,
                    "infer_ms": infer_ms,
                    "total_ms": (time.time() - msg.metadata.timestamp.timestamp()) * 1000,
                },
            }
            if "Jetinfer-Reply-To" in headers:
                await nc.publish(
                    headers["Jetinfer-Reply-To"], msgpack.packb(reply), headers={"Jetinfer-Status": "ok"}
                )
            await msg.ack()
    await nc.close()


def main() -> None:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()
    asyncio.run(serve(args.nats_url, args.repository, args.model))


if __name__ == "__main__":
    main()
