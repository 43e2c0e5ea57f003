"""The async client: `async with Client(url) as c: reply = await c.infer("resnet50", image, timeout=5)`.

One reply subscription (`<inbox>.*`) serves every request in flight; replies are matched by
request id, and duplicates (at-least-once delivery) are dropped and counted. Requests are
JetStream publishes with `Nats-Msg-Id`, retried with the same id, so a retried request is stored
once. A model nobody ever registered fails fast with `UnknownModelError`.

Replies are core NATS messages: one sent while this client was disconnected is gone. So after a
reconnect, every request still waiting is published again (after `resend_after_s`, so replies
already on their way arrive first), under the id `<id>~r<n>` (the original id is deduplicated by
JetStream for two minutes); whichever reply comes first answers the call, the other is dropped
as a duplicate. A reply lost in a server that died between the worker and this client, while this
client stayed connected elsewhere, is found through the consumer's ack floor (`lost_replies`): the
request is published again the same way.

With a tenant (`ClientSettings.tenant`, `--tenant`, `JETINFER_TENANT`), requests go to
`infer.<model>.<tenant>`, the reply inbox is below `_INBOX.<tenant>` and durable job replies go to
`results.<tenant>.<job>`: the only places a worker replies to for that tenant's requests. Request ids
are 128 random bits (`ids.new_request_id`), so no other tenant can predict one and publish it first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError

from jetinfer.cleanup import logged
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
    MAX_ID_LENGTH,
    ErrorReply,
    InferRequest,
    InferResponse,
    Limits,
    Tensor,
    check_model_name,
    decode_reply,
    decode_request,
    encode_request,
    request_headers,
)
from jetinfer.settings import ConnectionSettings
from jetinfer.streams import INFER_STREAM, consumer_name, infer_subject, results_subject, subject_matches

from .ids import id_key, keyed_tag, new_request_id
from .lost_replies import AckedWithoutReply
from .metrics import ClientMetrics
from .settings import ClientSettings

__all__ = ["Client", "Payload", "encode_payload"]

logger = logging.getLogger(__name__)

#: What `infer` accepts: an array (named `input`), named arrays, encoded image bytes, or an image/.npy path.
Payload = npt.NDArray[Any] | Mapping[str, npt.ArrayLike] | bytes | Path | list[bytes]

#: The server's -ERR for a consumer-info request this client may not publish (nats-py lowercases it).
_REFUSED_CONSUMER_INFO = re.compile(
    r"permissions violation for publish to \W*"
    + re.escape(f"$js.api.consumer.info.{INFER_STREAM}.worker-".lower())
    + r"([a-z0-9_-]{1,64})",
    re.IGNORECASE,
)

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
    """(body, content type) of a request for `payload`.

    A list of encoded images (JPEG or PNG bytes) is one request of that many frames: a BYTES input
    (`images`), answered with outputs of as many rows, in order.
    """
    if isinstance(payload, list):
        if not payload or not all(
            isinstance(image, bytes | bytearray) and _sniff_image(bytes(image)) for image in payload
        ):
            raise InvalidInputError("a list payload holds one or more JPEG or PNG images (bytes)")
        images = InferRequest(
            id=request_id,
            inputs=(Tensor.from_bytes("images", [bytes(image) for image in payload]),),
            parameters=dict(parameters or {}),
        )
        return encode_request(images), CONTENT_TYPE_MSGPACK
    if isinstance(payload, Path):
        suffix = payload.suffix.lower()
        if suffix in _IMAGE_SUFFIXES:
            return payload.read_bytes(), _IMAGE_SUFFIXES[suffix]
        if suffix == ".npy":
            path = payload
            try:
                payload = np.load(path, allow_pickle=False)
            except ValueError as exc:  # an object array: numpy would need pickle to read it
                raise InvalidInputError(f"{path}: {exc} (object arrays are never unpickled)") from None
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


@dataclasses.dataclass(frozen=True)
class _Sent:
    """A published request, kept until its reply so it can be published again after a reconnect."""

    model: str
    subject: str
    body: bytes
    content_type: str
    request_id: str
    reply_to: str
    deadline_ms: int | None
    published_at: float  # when the publish began
    stream_seq: int  # where INFER stored it (the PubAck's seq)


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
        resend_after_s: float = 1.0,
        lost_reply_check_s: float = 1.0,
    ) -> None:
        if settings is None:
            settings = ClientSettings(nats_url=url) if url else ClientSettings()
        self.settings = settings
        #: The tenant this client publishes as (ClientSettings.tenant), or None.
        self.tenant = settings.tenant if isinstance(settings, ClientSettings) else None
        self._id_key: bytes | None = None
        self.publish_retries = publish_retries
        self.publish_timeout_s = publish_timeout_s
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._sub: Subscription | None = None
        self._prefix = ""
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._sent: dict[str, _Sent] = {}  # token -> what to publish again after a reconnect
        self._stream_checks: dict[str, tuple[float, bool]] = {}  # subject -> (when, INFER takes it)
        self._sequence = 0
        self._attempts: dict[str, int] = {}  # token -> times published again
        self._resending: set[str] = set()  # tokens being published again right now
        self._resend_tasks: set[asyncio.Task[None]] = set()
        self.resend_after_s = resend_after_s
        self.duplicates_dropped = 0
        self.resent = 0  # requests published again (after a reconnect, or acknowledged without a reply)
        self.metrics = metrics
        self.lost_reply_check_s = lost_reply_check_s
        self._lost = AckedWithoutReply(
            self._ack_floor,
            self._ask_again,
            lambda: self._sub is not None and self._sub.pending_msgs > 0,
            check_s=lost_reply_check_s,
            grace_s=max(resend_after_s, 0.1),
        )
        self._lost_task: asyncio.Task[None] | None = None

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
        self._nc = await connect(
            self.settings,
            name="jetinfer-producer",
            reconnected_cb=self._on_reconnect,
            error_cb=self._on_server_error,
        )
        self._js = self._nc.jetstream(timeout=self.publish_timeout_s)
        self._prefix = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply, pending_msgs_limit=-1)
        if self.lost_reply_check_s > 0:
            self._lost_task = asyncio.create_task(self._lost.run(), name="jetinfer-lost-replies")
        return self

    @property
    def lost_replies(self) -> int:
        """Requests published again because a worker acknowledged them and no reply came."""
        return self._lost.asked_again

    async def close(self) -> None:
        """Fail the requests still waiting, unsubscribe and drain. Safe to call twice."""
        tasks = [*self._resend_tasks, *([self._lost_task] if self._lost_task is not None else [])]
        self._lost_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()
        self._sent.clear()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 5)
            except Exception:
                await logged(logger, "closing the client's connection", nc.close())

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

    async def _on_server_error(self, exc: Exception) -> bool:
        """A refused consumer-info request is the lost-reply watch's to report (once); True where handled."""
        found = _REFUSED_CONSUMER_INFO.search(str(exc))
        if found is None:
            return False
        self._lost.refused(found.group(1), str(exc).strip())
        return True

    async def _on_reconnect(self) -> None:
        task = asyncio.create_task(self._resend_waiting(time.monotonic()))
        self._resend_tasks.add(task)
        task.add_done_callback(self._resend_tasks.discard)

    async def _resend_waiting(self, reconnected_at: float) -> None:
        """Publish again the requests sent before a reconnect that still wait for their reply."""
        await asyncio.sleep(self.resend_after_s)
        waiting = [
            (token, sent)
            for token, sent in list(self._sent.items())
            if sent.published_at < reconnected_at and token in self._waiting
        ]
        if not waiting:
            return
        logger.info("reconnected: publishing %d requests still waiting again", len(waiting))
        for index in range(0, len(waiting), 256):
            chunk = waiting[index : index + 256]
            results = await asyncio.gather(
                *(self._resend(token, sent) for token, sent in chunk), return_exceptions=True
            )
            for (_, sent), result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    logger.warning("could not publish request %s again: %s", sent.request_id, result)

    async def _resend(self, token: str, sent: _Sent, *, lost_reply: bool = False) -> int | None:
        """Publish the request waiting under `token` again as `<id>~r<n>`; its new stream sequence, or None
        where it no longer waits, is being published again already (after a reconnect and as acked without
        a reply at once: one is enough), or its id has no room for the suffix."""
        if token not in self._waiting or token in self._resending:
            return None
        attempt = self._attempts.get(token, 0) + 1
        retry_id = f"{sent.request_id}~r{attempt}"
        if len(retry_id) > MAX_ID_LENGTH:
            return None
        self._attempts[token] = attempt
        body = sent.body
        if sent.content_type == CONTENT_TYPE_MSGPACK:
            request = decode_request(body, limits=Limits(max_bytes=len(body)))
            body = encode_request(dataclasses.replace(request, id=retry_id))
        headers = request_headers(
            retry_id, sent.reply_to, content_type=sent.content_type, deadline_ms=sent.deadline_ms
        )
        self._resending.add(token)
        try:
            stream_seq = await self._publish_with_retries(sent.subject, body, headers, retry_id)
        finally:
            self._resending.discard(token)
        self.resent += 1
        if self.metrics is not None:
            self.metrics.resent(sent.model, lost_reply=lost_reply)
        if token in self._waiting:
            self._lost.watch(token, sent.model, sent.request_id, stream_seq)
        return stream_seq

    async def _ask_again(self, token: str) -> int | None:
        sent = self._sent.get(token)
        return None if sent is None else await self._resend(token, sent, lost_reply=True)

    async def _ack_floor(self, model: str) -> int:
        """The stream sequence at and below which `model`'s consumer has acknowledged every request."""
        info = await self.js.consumer_info(INFER_STREAM, consumer_name(model), timeout=2.0)
        return int(info.ack_floor.stream_seq) if info.ack_floor is not None else 0

    def new_request_id(self) -> str:
        """A fresh, unique request id that nobody can predict (128 random bits)."""
        return new_request_id()

    def infer_subject(self, model: str) -> str:
        """Where this client publishes requests for `model`: `infer.<model>[.<tenant>]`."""
        return infer_subject(model, self.tenant)

    def results_subject(self, job: str) -> str:
        """Where durable replies of this client's job `job` go: `results.[<tenant>.]<job>`."""
        return results_subject(job, self.tenant)

    def id_tag(self, name: str) -> str | None:
        """With a tenant, a tag for ids derived from `name` that only this client's credential gives
        (`ids.keyed_tag`); None without a tenant (ids stay as they are)."""
        if self.tenant is None:
            return None
        if self._id_key is None:
            self._id_key = id_key(self.settings)
            if not self._id_key:
                logger.warning(
                    "tenant %s without credentials: ids derived from job names are predictable "
                    "(without authentication the server isolates no tenant anyway)",
                    self.tenant,
                )
        return keyed_tag(self._id_key, name)

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
        await self._publish_request(
            model,
            payload,
            request_id=request_id,
            reply_to=reply_to,
            deadline_ms=deadline_ms,
            input_name=input_name,
            parameters=parameters,
        )

    async def _publish_request(
        self,
        model: str,
        payload: Payload,
        *,
        request_id: str,
        reply_to: str,
        deadline_ms: int | None,
        input_name: str,
        parameters: Mapping[str, Any] | None,
    ) -> _Sent:
        check_model_name(model)
        body, content_type = encode_payload(request_id, payload, input_name=input_name, parameters=parameters)
        headers = request_headers(request_id, reply_to, content_type=content_type, deadline_ms=deadline_ms)
        subject = self.infer_subject(model)
        at = time.monotonic()  # before publishing: a reconnect while the PubAck is due can lose the reply
        stream_seq = await self._publish_with_retries(subject, body, headers, request_id)
        return _Sent(model, subject, body, content_type, request_id, reply_to, deadline_ms, at, stream_seq)

    async def _publish_with_retries(
        self, subject: str, body: bytes, headers: dict[str, str], request_id: str
    ) -> int:
        """Publish until JetStream stores it, and return its stream sequence: time-outs are retried
        `publish_retries` times with the same id;
        "no responders" is `UnknownModelError` unless INFER takes the subject (its leader is being
        elected: retried for up to `publish_timeout_s * (publish_retries + 1)`)."""
        deadline = time.monotonic() + self.publish_timeout_s * (self.publish_retries + 1)
        timeouts = 0
        while True:
            try:
                ack = await self.js.publish(subject, body, headers=headers, timeout=self.publish_timeout_s)
                return int(ack.seq)
            except MaxPayloadError:  # nats-py refuses it before sending: the connection stays up
                raise TooLargeError(
                    f"request of {len(body)} bytes is over the NATS server's max_payload of "
                    f"{self.nc.max_payload} bytes: send fewer frames per request (JPEGs rather than FP32 "
                    "tensors), or raise max_payload in the server's configuration (max_payload: 8MB)"
                ) from None
            except NoStreamResponseError:
                if not await self._stream_takes(subject):
                    model = subject.split(".")[1]
                    raise UnknownModelError(
                        f"no worker has registered model {model!r} (no stream takes {subject}); "
                        "start a worker that serves it"
                    ) from None
                if time.monotonic() > deadline:
                    raise RequestTimeoutError(request_id, self.publish_timeout_s) from None
                logger.info("stream %s has no leader for now; publishing %s again", INFER_STREAM, request_id)
                await asyncio.sleep(0.25)
            except TimeoutError as exc:
                timeouts += 1
                if timeouts > self.publish_retries:
                    raise RequestTimeoutError(request_id, self.publish_timeout_s) from exc
                logger.info("publish of %s timed out; retrying with the same Nats-Msg-Id", request_id)
                await asyncio.sleep(0.2 * timeouts)

    async def _stream_takes(self, subject: str) -> bool:
        """Whether INFER takes `subject` (checked at most twice a second); True when it cannot be told."""
        now = time.monotonic()
        known = self._stream_checks.get(subject)
        if known is not None and now - known[0] < 0.5:
            return known[1]
        try:
            info = await asyncio.wait_for(self.js.stream_info(INFER_STREAM), 2)
            takes = any(subject_matches(pattern, subject) for pattern in info.config.subjects or [])
        except NotFoundError:
            takes = False
        except Exception as exc:  # JetStream itself electing a leader, or no permission to ask
            logger.debug("cannot read stream %s: %s", INFER_STREAM, exc)
            takes = True
        self._stream_checks[subject] = (time.monotonic(), takes)
        return takes

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
            sent = self._sent[token] = await self._publish_request(
                model,
                payload,
                request_id=request_id,
                reply_to=f"{self._prefix}.{token}",
                deadline_ms=deadline_ms,
                input_name=input_name,
                parameters=parameters,
            )
            self._lost.watch(token, model, request_id, sent.stream_seq)
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
            self._sent.pop(token, None)
            self._attempts.pop(token, None)
            self._lost.forget(token)
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
            # A request published again after a reconnect is answered under `<id>~r<n>`.
            if not re.fullmatch(re.escape(request_id) + r"~r[0-9]+", reply.id):
                raise InvalidInputError(f"reply id {reply.id!r} does not match request {request_id!r}")
            reply = dataclasses.replace(reply, id=request_id)
        if msg.headers and msg.headers.get(HEADER_STATUS) not in (None, "ok"):
            raise InvalidInputError("reply header says error but the body is a result")
        return reply
