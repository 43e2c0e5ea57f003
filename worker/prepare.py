"""Prepare: a delivered message becomes a validated request, or a rejection.

`prepare_request` is pure (no NATS call, no decoding of images) and never raises: a bad request
comes back with its `error` set, for the settle stage to answer and terminate. Validation happens
before any allocation: header and size checks first, then msgpack's own limits, then element count
× datatype size = bytes, shape within the model's spec, frames within max_batch. An image request
keeps its encoded bytes (`encoded`); the preprocessing strategy decides where they are decoded.
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
from jetinfer.protocol import (
    BYTES,
    CONTENT_TYPE_JPEG,
    CONTENT_TYPE_MSGPACK,
    HEADER_CONTENT_TYPE,
    HEADER_DEADLINE,
    HEADER_MSG_ID,
    HEADER_REPLY_TO,
    IMAGE_CONTENT_TYPES,
    MAX_ID_LENGTH,
    Limits,
    Tensor,
    decode_request,
)
from jetinfer.repository import ModelConfig

from .intake import delivery_info
from .reply_policy import ReplyPolicy

__all__ = [
    "CONTENT_TYPE_IMAGES",
    "PreparedRequest",
    "check_deadline",
    "is_jpeg",
    "prepare_request",
    "request_content_type",
    "unprepared",
]

_REPLY_SUBJECT: Final = re.compile(r"[A-Za-z0-9_\-$]+(\.[A-Za-z0-9_\-$]+)*")
_DEFAULT_REPLY_POLICY: Final = ReplyPolicy()
#: The content type of a request of several encoded images (BYTES) not all of them JPEGs.
CONTENT_TYPE_IMAGES: Final = "image/*"


@dataclass(slots=True, eq=False)
class PreparedRequest:
    """A request taken from the stream: its identity, where to reply, and its inputs or its error.

    Filled in by prepare and, for images, by the preprocessing strategy's CPU decoding; unchanged
    once it is in a batch.
    """

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
    encoded: tuple[bytes, ...] = ()  # encoded images, one per frame, not decoded yet
    pixels: bool = False  # inputs hold (N, H, W, 3) uint8 pixels for the GPU to normalise

    @property
    def shape_key(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Per-frame shapes; requests with the same key can share a batch."""
        if self.encoded:
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
    reply_policy: ReplyPolicy = _DEFAULT_REPLY_POLICY,
) -> PreparedRequest:
    """Read and validate one message for `config`. Never raises; errors are set on the result.

    Tensors are decoded and checked here; an image is checked for size and kept encoded. `reply_policy`
    decides where the reply may go (a `Jetinfer-Reply-To` outside it is invalid_input, answered nowhere).
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
            request.encoded = (bytes(msg.data),)
            request.frames = 1
        elif content_type == CONTENT_TYPE_MSGPACK:
            decoded = decode_request(msg.data, limits=limits)
            if decoded.id != request_id and request_id:
                raise InvalidInputError(f"body id {decoded.id!r} differs from {HEADER_MSG_ID} {request_id!r}")
            request.request_id = decoded.id
            if any(tensor.datatype == BYTES for tensor in decoded.inputs):
                _take_images(request, decoded.inputs, config, max_batch)
                return _finish(request, msg)
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
        if request.frames == 0:  # tensors: validate; an encoded image is one frame by design
            request.frames = _validate(inputs, config, max_batch)
            request.inputs = inputs
    except RequestError as exc:
        request.error = exc.detached()
    except Exception as exc:  # never let a malformed request escape as a crash
        request.error = InvalidInputError(f"cannot read request: {type(exc).__name__}: {exc}")
    return _finish(request, msg)


def _finish(request: PreparedRequest, msg: Msg) -> PreparedRequest:
    """A request without an id is refused (and named by its stream sequence)."""
    if not request.request_id:
        request.request_id = _sequence_id(msg)
        if request.error is None:
            request.error = InvalidInputError(f"request has no id: set the {HEADER_MSG_ID} header")
    return request


def _take_images(
    request: PreparedRequest, tensors: tuple[Tensor, ...], config: ModelConfig, max_batch: int
) -> None:
    """Several encoded images in one message: a single BYTES input of an image model, a frame each."""
    if config.preprocess is None:
        raise InvalidInputError(f"model {config.name} takes tensors, not BYTES (encoded images)")
    if len(tensors) != 1:
        raise InvalidInputError("a request of encoded images (BYTES) carries that one input and no other")
    images = tuple(tensors[0].elements())
    if not images:
        raise InvalidInputError("a request needs at least one frame (a BYTES input of one image or more)")
    if len(images) > max_batch:
        raise TooLargeError(
            f"request carries {len(images)} images; model {config.name} takes at most {max_batch}"
        )
    if not all(images):
        raise InvalidInputError(f"image {images.index(b'')} of the request is empty")
    # JPEGs may stay encoded for the GPU decoder; a mix is decoded like the PNGs.
    request.content_type = (
        CONTENT_TYPE_JPEG if all(is_jpeg(image) for image in images) else CONTENT_TYPE_IMAGES
    )
    request.encoded = images
    request.frames = len(images)


def unprepared(msg: Msg) -> PreparedRequest:
    """A message's identity alone (id, deliveries), with no reply subject: for settling a message whose
    preparation failed, where nothing else it carries can be trusted."""
    deliveries, enqueued_at = delivery_info(msg)
    request_id = (msg.headers or {}).get(HEADER_MSG_ID, "")[:MAX_ID_LENGTH] or _sequence_id(msg)
    return PreparedRequest(
        msg=msg, request_id=request_id, reply_to=None, deliveries=deliveries, enqueued_at=enqueued_at
    )


def _sequence_id(msg: Msg) -> str:
    """`seq-<stream sequence>` from the ack subject, for a request that carries no id."""
    seq = msg.reply.split(".")[5] if msg.reply and msg.reply.count(".") >= 8 else "?"
    return f"seq-{seq}"
