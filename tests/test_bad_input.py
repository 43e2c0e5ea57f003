"""Bad input gets the right typed error reply, lands in the DLQ, never crashes the worker (issue 2)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import numpy as np
import pytest

from jetinfer.producer.client import Client
from jetinfer.protocol import ErrorReply, InferResponse, decode_reply, request_headers
from jetinfer.streams import infer_subject
from tests.conftest import NatsUnderTest, running_worker

GOOD = np.ones((1, 256), np.float32)


def tensor_body(request_id: str, **overrides: Any) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 256], "data": GOOD.tobytes()}
    tensor.update(overrides)
    return msgpack.packb({"id": request_id, "inputs": [tensor]}, use_bin_type=True)


CASES: dict[str, tuple[bytes | None, str, dict[str, str]]] = {
    # name: (body (None: built from the id), expected code, extra headers)
    "garbage bytes": (b"\x00\x01garbage\xc1", "invalid_input", {}),
    "msgpack of the wrong shape": (msgpack.packb([1, 2, 3]), "invalid_input", {}),
    "wrong datatype": (None, "invalid_input", {"datatype": "FP64", "data": np.ones((1, 256)).tobytes()}),
    "byte count does not match shape": (None, "invalid_input", {"data": GOOD.tobytes()[:-4]}),
    "per-frame shape not the model's": (None, "invalid_input", {"shape": [1, 16, 16]}),
    "shape over the size limit": (None, "too_large", {"shape": [1, 2**40], "data": b""}),
    "negative shape": (None, "invalid_input", {"shape": [1, -256]}),
    "batch over max_batch": (
        None,
        "too_large",
        {"shape": [300, 256], "data": np.ones((300, 256), np.float32).tobytes()},
    ),
    "corrupt jpeg": (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "invalid_input", {"content_type": "image/jpeg"}),
    "expired deadline": (None, "deadline_exceeded", {"deadline": "expired"}),
    "msgpack extension type": (
        msgpack.packb({"id": "x", "inputs": msgpack.ExtType(1, b"\x00")}),
        "invalid_input",
        {},
    ),
}


async def _ask(nc: Any, model: str, request_id: str, body: bytes, headers: dict[str, str]) -> tuple[Any, Any]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    all_headers = request_headers(
        request_id, inbox, content_type=headers.get("content_type", "application/msgpack")
    )
    if headers.get("deadline") == "expired":
        all_headers["Jetinfer-Deadline"] = str(int((time.time() - 5) * 1000))
    await nc.jetstream().publish(infer_subject(model), body, headers=all_headers)
    msg = await sub.next_msg(timeout=30)
    await sub.unsubscribe()
    return decode_reply(msg.data), msg.headers


@pytest.mark.parametrize("fronts", [0, 2], ids=["in-process", "two-fronts"])
async def test_each_bad_input_gets_its_error_code_and_the_worker_keeps_serving(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, fronts: int
) -> None:
    repo, model = model_repo("identity")
    async with running_worker(nats_server.url, repo, [model], max_batch=64, fronts=fronts) as worker:
        for index, (name, (body, code, extra)) in enumerate(CASES.items()):
            request_id = f"bad-{index}-{model}"  # ids are the stream's dedup keys: unique per test
            tensor_overrides = {k: v for k, v in extra.items() if k not in ("content_type", "deadline")}
            raw = body if body is not None else tensor_body(request_id, **tensor_overrides)
            reply, headers = await _ask(nc, model, request_id, raw, extra)
            assert isinstance(reply, ErrorReply), f"{name}: expected an error reply, got {reply}"
            assert reply.code == code, f"{name}: expected {code}, got {reply.code} ({reply.message})"
            assert reply.id == request_id, f"{name}: reply id {reply.id!r}"
            assert reply.message, f"{name}: the error says nothing"
            assert headers["Jetinfer-Status"] == "error"
        # A good request right after is answered.
        reply, _ = await _ask(nc, model, f"good-{model}", tensor_body(f"good-{model}"), {})
        assert isinstance(reply, InferResponse)
        np.testing.assert_array_equal(reply.output(), GOOD)
        assert worker.readiness()[0]

    # Every bad request left a copy with its reason in the DLQ, and nothing is left in INFER.
    js = nc.jetstream()
    dlq = await js.pull_subscribe(f"dlq.{model}", durable=None, stream="DLQ")
    copies = await dlq.fetch(len(CASES), timeout=5)
    reasons = sorted(m.headers["Jetinfer-Dlq-Reason"] for m in copies)
    assert reasons == sorted(code for _, code, _ in CASES.values())
    info = await js.consumer_info("INFER", f"worker-{model}")
    assert info.num_pending == 0
    assert info.num_ack_pending == 0


async def test_unknown_content_type_and_images_to_a_tensor_model(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, cat_jpeg: bytes
) -> None:
    repo, model = model_repo("identity")
    async with running_worker(nats_server.url, repo, [model]):
        reply, _ = await _ask(nc, model, "ct", b"{}", {"content_type": "application/json"})
        assert isinstance(reply, ErrorReply)
        assert reply.code == "invalid_input"
        assert "Content-Type" in reply.message
        reply, _ = await _ask(nc, model, "img", cat_jpeg, {"content_type": "image/jpeg"})
        assert isinstance(reply, ErrorReply)
        assert "takes tensors" in reply.message


async def test_client_raises_the_typed_error(nats_server: NatsUnderTest, model_repo: Any) -> None:
    from jetinfer.errors import InvalidInputError, TooLargeError

    repo, model = model_repo("identity")
    async with running_worker(nats_server.url, repo, [model]), Client(nats_server.url) as client:
        with pytest.raises(InvalidInputError, match="does not fit"):
            await client.infer(model, np.ones((1, 3, 4), np.float32), timeout=30)
        with pytest.raises(InvalidInputError, match="datatype"):
            await client.infer(model, np.ones((1, 256), np.float64), timeout=30)
        with pytest.raises(TooLargeError):
            await client.infer(model, np.ones((257, 256), np.float32), timeout=30)
        reply = await client.infer(model, GOOD, timeout=30)
        assert reply.output().shape == (1, 256)


async def test_request_without_reply_subject_is_terminated_not_retried(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any
) -> None:
    repo, model = model_repo("identity")
    js = nc.jetstream()
    async with running_worker(nats_server.url, repo, [model]):
        await js.publish(infer_subject(model), tensor_body("no-reply"), headers={"Nats-Msg-Id": "no-reply"})
        for _ in range(100):
            info = await js.consumer_info("INFER", f"worker-{model}")
            if info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq > 0:
                break
            await asyncio.sleep(0.05)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0
