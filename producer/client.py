"""The async client: `async with Client(url) as c: reply = await c.infer("resnet50", image, timeout=5)`.

One reply subscription (`<inbox>.*`) serves every request in flight; replies are matched by
request id, and duplicates (at-least-once delivery) are dropped and counted. Requests are
JetStream publishes with `Nats-Msg-Id`, retried with the same id, so a retried request is stored
once. A model nobody ever registered fails fast with `UnknownModelError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from jetinfer.connection import connect
from jetinfer.errors import (
    InvalidInputError,
    RequestError,
    RequestTimeoutError,
    TooLargeError,
    UnknownModelError,
    error_for_code,
)
from jetinfer.protocol import (
    CONTENT_TYPE_JPEG,
    CONTENT_TYPE_MSGPACK,
    CONTENT_TYPE_PNG,
    HEADER_STATUS,
    ErrorReply,
    InferRequest,
    InferResponse,
    Tensor,
    check_model_name,
    decode_reply,
    encode_request,
    request_headers,
)
from jetinfer.settings import ConnectionSettings
from jetinfer.streams import infer_subject
from producer.metrics import ClientMetrics

__all__ = ["Client", "Payload", "encode_payload"]

logger = logging.getLogger(__name__)

#: What `infer` accepts: an array (named `input`), named arrays, encoded image bytes, or an image/.npy path.
Payload = npt.NDArray[Any] | Mapping[str, npt.ArrayLike] | bytes | Path

_IMAGE_SUFFIXES = {".jpg": CONTENT_TYPE_JPEG, ".jpeg": CONTENT_TYPE_JPEG, ".png": CONTENT_TYPE_PNG}


def _sniff_image(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return CONTENT_TYPE_JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return CONTENT_TYPE_PNG
    return None


def encode_payload(
    request_id: str,
    payload: Payload,
    *,
    input_name: str = "input",
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, str]:
    """(body, content type) of a request for `payload`."""
    if isinstance(payload, Path):
        suffix = payload.suffix.lower()
        if suffix in _IMAGE_SUFFIXES:
            return payload.read_bytes(), _IMAGE_SUFFIXES[suffix]
        if suffix == ".npy":
            payload = np.load(payload, allow_pickle=False)
        else:
            raise InvalidInputError(f"{payload}: send .jpg, .jpeg, .png or .npy files")
    if isinstance(payload, bytes | bytearray | memoryview):
        raw = bytes(payload)
        content_type = _sniff_image(raw)
        if content_type is None:
            raise InvalidInputError("bytes payloads must be JPEG or PNG images; send arrays as numpy arrays")
        return raw, content_type
    arrays: dict[str, Any]
    if isinstance(payload, np.ndarray):
        arrays = {input_name: payload}
    elif isinstance(payload, Mapping):
        arrays = dict(payload.items())
    else:
        raise InvalidInputError(
            f"cannot send a {type(payload).__name__}: send an array, named arrays or image bytes"
        )
    request = InferRequest(
        id=request_id,
        inputs=tuple(Tensor.from_numpy(name, np.asarray(array)) for name, array in arrays.items()),
        parameters=dict(parameters or {}),
    )
    return encode_request(request), CONTENT_TYPE_MSGPACK


class Client:
    """An async inference client over NATS JetStream; many requests may be in flight at once."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: ConnectionSettings | None = None,
        publish_retries: int = 3,
        publish_timeout_s: float = 5.0,
        metrics: ClientMetrics | None = None,
    ) -> None:
        if settings is None:
            settings = ConnectionSettings(nats_url=url) if url else ConnectionSettings()
        self.settings = settings
        self.publish_retries = publish_retries
        self.publish_timeout_s = publish_timeout_s
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._sub: Subscription | None = None
        self._prefix = ""
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._sequence = 0
        self.duplicates_dropped = 0
        self.metrics = metrics

    @property
    def nc(self) -> NatsClient:
        """The underlying NATS connection (after `connect`)."""
        if self._nc is None:
            raise RuntimeError("client is not connected: use `async with Client(...)` or `await connect()`")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (after `connect`)."""
        if self._js is None:
            raise RuntimeError("client is not connected")
        return self._js

    async def connect(self) -> Self:
        """Connect and subscribe to this client's reply inbox."""
        if self._nc is not None:
            return self
        self._nc = await connect(self.settings, name="jetinfer-producer")
        self._js = self._nc.jetstream(timeout=self.publish_timeout_s)
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply, pending_msgs_limit=-1)
        return self

    async def close(self) -> None:
        """Fail the requests still waiting, unsubscribe and drain. Safe to call twice."""
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 5)
            except Exception:
                with contextlib.suppress(Exception):
                    await nc.close()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        future = self._waiting.pop(token, None)
        if future is None or future.done():
            self.duplicates_dropped += 1
            if self.metrics is not None:
                self.metrics.duplicate()
            return
        future.set_result(msg)

    def new_request_id(self) -> str:
        """A fresh, unique request id."""
        return uuid.uuid4().hex

    async def publish(
        self,
        model: str,
        payload: Payload,
        *,
        request_id: str,
        reply_to: str,
        deadline_ms: int | None = None,
        input_name: str = "input",
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish one request to `infer.<model>` (JetStream, retried with the same id)."""
        check_model_name(model)
        body, content_type = encode_payload(request_id, payload, input_name=input_name, parameters=parameters)
        max_payload = self.nc.max_payload
        if len(body) > max_payload:
            raise TooLargeError(
                f"request of {len(body)} bytes is over the server's max_payload of {max_payload}"
            )
        headers = request_headers(request_id, reply_to, content_type=content_type, deadline_ms=deadline_ms)
        for attempt in range(self.publish_retries + 1):
            try:
                await self.js.publish(
                    infer_subject(model), body, headers=headers, timeout=self.publish_timeout_s
                )
                return
            except NoStreamResponseError:
                raise UnknownModelError(
                    f"no worker has registered model {model!r} (no stream takes infer.{model}); "
                    "start a worker that serves it"
                ) from None
            except TimeoutError as exc:
                if attempt == self.publish_retries:
                    raise RequestTimeoutError(request_id, self.publish_timeout_s) from exc
                logger.info("publish of %s timed out; retrying with the same Nats-Msg-Id", request_id)
                await asyncio.sleep(0.2 * (attempt + 1))

    async def infer(
        self,
        model: str,
        payload: Payload,
        *,
        timeout: float = 30.0,
        request_id: str | None = None,
        input_name: str = "input",
        parameters: Mapping[str, Any] | None = None,
    ) -> InferResponse:
        """Send one request and wait for its reply.

        Raises `UnknownModelError` if nobody serves `model`, the matching `RequestError` subclass for an
        error reply (e.g. `InvalidInputError`), or `RequestTimeoutError` after `timeout` seconds.
        """
        request_id = request_id or self.new_request_id()
        self._sequence += 1
        token = f"{self._sequence}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        deadline_ms = int((time.time() + timeout) * 1000)
        started = time.perf_counter()
        try:
            await self.publish(
                model,
                payload,
                request_id=request_id,
                reply_to=f"{self._prefix}.{token}",
                deadline_ms=deadline_ms,
                input_name=input_name,
                parameters=parameters,
            )
            if self.metrics is not None:
                self.metrics.sent(model)
            try:
                msg = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                if self.metrics is not None:
                    self.metrics.timed_out(model)
                raise RequestTimeoutError(request_id, timeout) from None
        finally:
            self._waiting.pop(token, None)
        if self.metrics is None:
            return self.read_reply(msg, request_id)
        try:
            response = self.read_reply(msg, request_id)
        except RequestError as exc:
            self.metrics.replied(model, exc.code, time.perf_counter() - started)
            raise
        self.metrics.replied(model, "ok", time.perf_counter() - started)
        return response

    @staticmethod
    def read_reply(msg: Msg, request_id: str | None = None) -> InferResponse:
        """Decode a reply message; raise the matching error for an error reply."""
        reply = decode_reply(msg.data)
        if isinstance(reply, ErrorReply):
            error = error_for_code(reply.code, reply.message)
            error.code = reply.code
            raise error
        if request_id is not None and reply.id != request_id:
            raise InvalidInputError(f"reply id {reply.id!r} does not match request {request_id!r}")
        if msg.headers and msg.headers.get(HEADER_STATUS) not in (None, "ok"):
            raise InvalidInputError("reply header says error but the body is a result")
        return reply
