"""The bare message path, as a baseline for benchmarks: fetch, publish a minimal reply, ack.

No decoding, no model, no batching logic: the fastest a single nats-py process can turn a request
into a reply with a JetStream pull consumer. `jetinfer bench --bare` runs it instead of the worker,
so the worker's overhead is measured as a ratio in the same run.

    python -m jetinfer.bench.bare_loop --nats-url URL --model NAME [--batch 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import msgpack
import nats
from nats.errors import TimeoutError as NatsTimeoutError

from jetinfer.protocol import HEADER_MSG_ID, HEADER_REPLY_TO
from jetinfer.settings import StreamSettings
from jetinfer.streams import INFER_STREAM, consumer_name, ensure_consumer, ensure_streams, register_model

__all__ = ["bare_loop", "main"]


async def bare_loop(url: str, model: str, batch: int, stop: asyncio.Event) -> int:
    """Serve `infer.<model>` with echo replies until `stop`; returns the number of messages handled."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream()
    settings = StreamSettings()
    await ensure_streams(js, settings)
    await register_model(js, model, settings)
    await ensure_consumer(js, model, settings)
    subscription = await js.pull_subscribe_bind(consumer_name(model), stream=INFER_STREAM)
    handled = 0
    print("bare loop ready", flush=True)
    while not stop.is_set():
        try:
            msgs = await subscription.fetch(batch, timeout=0.5)
        except (NatsTimeoutError, TimeoutError):
            continue
        for msg in msgs:
            headers = msg.headers or {}
            reply_to = headers.get(HEADER_REPLY_TO)
            if reply_to:
                body = msgpack.packb(
                    {
                        "id": headers.get(HEADER_MSG_ID, ""),
                        "model_name": model,
                        "model_version": "0",
                        "outputs": [],
                        "timing": {},
                    }
                )
                await nc.publish(reply_to, body, headers={"Jetinfer-Status": "ok"})
            await msg.ack()
        handled += len(msgs)
    # Everything fetched is answered by now: send what is buffered and close (a drain would wait on the
    # fetch's inbox subscription, up to its timeout).
    with contextlib.suppress(Exception):
        await nc.flush(timeout=5)
    await nc.close()
    return handled


def main() -> None:
    """Run the bare loop until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nats-url", required=True, help="NATS server URL")
    parser.add_argument("--model", required=True, help="model name whose consumer to drain")
    parser.add_argument("--batch", type=int, default=256, help="messages per fetch")
    args = parser.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(asyncio.CancelledError):
            await bare_loop(args.nats_url, args.model, args.batch, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
