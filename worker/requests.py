"""Turning a JetStream message into a validated request, ready to batch.

`prepare_request` never raises: a bad request comes back with its `error` set, so the ack
policy can answer it and terminate it. Validation happens before any allocation: header and
size checks first, then msgpack's own limits, then element count × datatype size = bytes, shape
within the model's spec, frames within max_batch.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy.typing as npt
from nats.aio.msg import Msg

from jetinfer.errors import (
    DeadlineExceededError,
    InvalidInputError,
    RequestError,
    TooLargeError,
)
from jetinfer.images import decode_pixels, preprocess_image
from jetinfer.protocol import (
    CONTENT_TYPE_JPEG,
    CONTENT_TYPE_MSGPACK,
    HEADER_CONTENT_TYPE,
    HEADER_DEADLINE,
    HEADER_MSG_ID,
    HEADER_REPLY_TO,
    IMAGE_CONTENT_TYPES,
    Limits,
    decode_request,
)
from jetinfer.repository import ModelConfig

from .consumer import delivery_info
from .reply_policy import ReplyPolicy

__all__ = [
    "PreparedRequest",
    "check_deadline",
    "is_jpeg",
    "leaves_encoded",
    "prepare_request",
    "request_content_type",
]

_REPLY_SUBJECT: Final = re.compile(r"[A-Za-z0-9_\-$]+(\.[A-Za-z0-9_\-$]+)*")
_DEFAULT_REPLY_POLICY: Final = ReplyPolicy()


@dataclass
class PreparedRequest:
    """A request taken from the stream: its identity, where to reply, and its inputs or its error."""

    msg: Msg
    request_id: str
    reply_to: str | None
    deliveries: int
    enqueued_at: float  # JetStream timestamp, epoch seconds
    deadline_s: float | None = None
    inputs: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    frames: int = 0
    error: RequestError | None = None
    content_type: str = CONTENT_TYPE_MSGPACK
    encoded: bytes | None = None  # an image left encoded for --gpu-decode or --decode-processes
    pixels: bool = False  # inputs hold (1, H, W, 3) uint8 pixels for the GPU to normalise (--gpu-normalise)

    @property
    def shape_key(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Per-frame shapes; requests with the same key can share a batch."""
        if self.encoded is not None:
            return (("encoded-image", ()),)
        if self.pixels:
            return tuple(sorted((f"pixels:{n}", tuple(a.shape[1:])) for n, a in self.inputs.items()))
        return tuple(sorted((name, tuple(arr.shape[1:])) for name, arr in self.inputs.items()))


def request_content_type(headers: Mapping[str, str] | None) -> str:
    """A message's Content-Type without parameters, lower-case (application/msgpack when absent)."""
    return (headers or {}).get(HEADER_CONTENT_TYPE, CONTENT_TYPE_MSGPACK).split(";")[0].strip().lower()


def is_jpeg(data: bytes) -> bool:
    """Whether `data` starts like a JPEG (SOI marker, then another marker)."""
    return data[:3] == b"\xff\xd8\xff"


def leaves_encoded(content_type: str, data: bytes, *, gpu_jpeg: bool, defer_images: bool) -> bool:
    """Whether an image request is left encoded here, to be decoded with its batch: by nvJPEG
    (`gpu_jpeg`, JPEGs only) or by the decoding processes (`defer_images`, any image)."""
    return defer_images or (gpu_jpeg and content_type == CONTENT_TYPE_JPEG and is_jpeg(data))


def check_deadline(request: PreparedRequest, now: float | None = None) -> None:
    """Raise DeadlineExceededError if the request's deadline has passed."""
    if request.deadline_s is not None and (now or time.time()) > request.deadline_s:
        raise DeadlineExceededError(
            f"deadline passed {((now or time.time()) - request.deadline_s) * 1000:.0f} ms "
            "before the request ran"
        )


def _validate(inputs: dict[str, npt.NDArray[Any]], config: ModelConfig, max_batch: int) -> int:
    wanted = {spec.name: spec for spec in config.inputs}
    if set(inputs) != set(wanted):
        raise InvalidInputError(f"model {config.name} takes inputs {sorted(wanted)}, got {sorted(inputs)}")
    frames = -1
    for name, array in inputs.items():
        spec = wanted[name]
        if array.ndim < 1:
            raise InvalidInputError(f"input {name}: the first dimension is the batch; got a scalar")
        if not spec.accepts(array.shape[1:]):
            raise InvalidInputError(
                f"input {name}: per-frame shape {list(array.shape[1:])} does not fit {list(spec.shape)} "
                f"(the first dimension is the batch)"
            )
        frames = array.shape[0] if frames < 0 else frames
    if frames < 1:
        raise InvalidInputError("a request needs at least one frame (first dimension >= 1)")
    if frames > max_batch:
        raise TooLargeError(f"request carries {frames} frames; model {config.name} takes at most {max_batch}")
    return frames


def prepare_request(
    msg: Msg,
    config: ModelConfig,
    *,
    max_batch: int,
    limits: Limits,
    gpu_jpeg: bool = False,
    gpu_pixels: bool = False,
    defer_images: bool = False,
    reply_policy: ReplyPolicy = _DEFAULT_REPLY_POLICY,
) -> PreparedRequest:
    """Decode and validate one message for `config`. Never raises; errors are set on the result.

    With `gpu_jpeg`, a JPEG request is checked for size only and left encoded for the GPU decoder.
    With `gpu_pixels`, an image is decoded to uint8 pixels here and normalised on the GPU later.
    With `defer_images`, every image is checked for size only and left encoded for the batch's
    decoding processes (`--decode-processes`). `reply_policy` decides where the reply may go (a
    `Jetinfer-Reply-To` outside it is invalid_input, answered nowhere).
    """
    headers = msg.headers or {}
    deliveries, enqueued_at = delivery_info(msg)
    request_id = headers.get(HEADER_MSG_ID, "")
    reply_to = headers.get(HEADER_REPLY_TO) or None
    request = PreparedRequest(
        msg=msg, request_id=request_id, reply_to=reply_to, deliveries=deliveries, enqueued_at=enqueued_at
    )
    inputs: dict[str, npt.NDArray[Any]] = {}
    try:
        if reply_to is not None and (len(reply_to) > 256 or not _REPLY_SUBJECT.fullmatch(reply_to)):
            request.reply_to = None
            raise InvalidInputError(f"{HEADER_REPLY_TO} {reply_to[:64]!r} is not a valid subject")
        if reply_to is not None:
            request.reply_to = None  # answered nowhere unless the policy allows it
            request.reply_to = reply_policy.reply_subject(reply_to, msg.subject)
        deadline = headers.get(HEADER_DEADLINE)
        if deadline is not None:
            try:
                request.deadline_s = int(deadline) / 1000.0
            except ValueError:
                raise InvalidInputError(
                    f"{HEADER_DEADLINE} must be epoch milliseconds, got {deadline[:32]!r}"
                ) from None
            check_deadline(request)
        content_type = request_content_type(headers)
        request.content_type = content_type
        if content_type in IMAGE_CONTENT_TYPES:
            if config.preprocess is None:
                raise InvalidInputError(f"model {config.name} takes tensors, not {content_type} images")
            if len(msg.data) > limits.max_bytes:
                raise TooLargeError(f"image of {len(msg.data)} bytes is over {limits.max_bytes}")
            if leaves_encoded(content_type, msg.data, gpu_jpeg=gpu_jpeg, defer_images=defer_images):
                request.encoded = bytes(msg.data)
                request.frames = 1
            elif gpu_pixels:
                request.inputs = {config.preprocess.input: decode_pixels(msg.data, config.preprocess)}
                request.pixels = True
                request.frames = 1
            else:
                inputs = {config.preprocess.input: preprocess_image(msg.data, config.preprocess)}
        elif content_type == CONTENT_TYPE_MSGPACK:
            decoded = decode_request(msg.data, limits=limits)
            if decoded.id != request_id and request_id:
                raise InvalidInputError(f"body id {decoded.id!r} differs from {HEADER_MSG_ID} {request_id!r}")
            request.request_id = decoded.id
            wanted = {spec.name: spec.datatype for spec in config.inputs}
            for tensor in decoded.inputs:
                if tensor.name in wanted and tensor.datatype != wanted[tensor.name]:
                    raise InvalidInputError(
                        f"input {tensor.name}: datatype {tensor.datatype}; model {config.name} takes "
                        f"{wanted[tensor.name]}"
                    )
            inputs = {tensor.name: tensor.to_numpy() for tensor in decoded.inputs}
        else:
            raise InvalidInputError(
                f"Content-Type {content_type[:64]!r} is not one of application/msgpack, image/jpeg, image/png"
            )
        if request.frames == 0:  # decoded here: validate; pixels and encoded JPEGs are one frame by design
            request.frames = _validate(inputs, config, max_batch)
            request.inputs = inputs
    except RequestError as exc:
        request.error = exc
    except Exception as exc:  # never let a malformed request escape as a crash
        request.error = InvalidInputError(f"cannot read request: {type(exc).__name__}: {exc}")
    if not request.request_id:
        seq = msg.reply.split(".")[5] if msg.reply and msg.reply.count(".") >= 8 else "?"
        request.request_id = f"seq-{seq}"
        if request.error is None:
            request.error = InvalidInputError(f"request has no id: set the {HEADER_MSG_ID} header")
    return request
