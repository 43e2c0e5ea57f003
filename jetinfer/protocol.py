"""Wire protocol v1: requests, replies and tensors, encoded with msgpack (never pickle).

Shaped after the Open Inference Protocol (KServe v2 / Triton). docs/protocol.md is the
language-neutral reference; this module is its Python implementation. Every decoder here
validates sizes *before* it allocates anything, and turns every malformed input into an
`InvalidInputError` or `TooLargeError`, never another exception.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

from jetinfer.errors import InvalidInputError, TooLargeError

__all__ = [
    "BYTES",
    "CONTENT_TYPE_JPEG",
    "CONTENT_TYPE_MSGPACK",
    "CONTENT_TYPE_PNG",
    "DATATYPES",
    "HEADER_CONTENT_TYPE",
    "HEADER_DEADLINE",
    "HEADER_DLQ_DELIVERIES",
    "HEADER_DLQ_MESSAGE",
    "HEADER_DLQ_REASON",
    "HEADER_DLQ_TRUNCATED",
    "HEADER_MSG_ID",
    "HEADER_REPLY_TO",
    "HEADER_REQUEST_ID",
    "HEADER_STATUS",
    "IMAGE_CONTENT_TYPES",
    "MAX_NDIM",
    "MODEL_NAME_PATTERN",
    "ErrorReply",
    "InferRequest",
    "InferResponse",
    "Limits",
    "Reply",
    "Tensor",
    "check_model_name",
    "datatype_of",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_outputs",
    "encode_request",
    "encode_response",
    "request_headers",
]

HEADER_MSG_ID: Final = "Nats-Msg-Id"
HEADER_REPLY_TO: Final = "Jetinfer-Reply-To"
HEADER_DEADLINE: Final = "Jetinfer-Deadline"
HEADER_CONTENT_TYPE: Final = "Content-Type"
HEADER_STATUS: Final = "Jetinfer-Status"
#: Headers of a DLQ copy: why the request was given up, the error's message, after how many deliveries,
#: and the request id (the copy's own Nats-Msg-Id is `dlq-...`, so copies of redeliveries dedupe).
HEADER_DLQ_REASON: Final = "Jetinfer-Dlq-Reason"
HEADER_DLQ_MESSAGE: Final = "Jetinfer-Dlq-Message"
HEADER_DLQ_DELIVERIES: Final = "Jetinfer-Dlq-Deliveries"
HEADER_REQUEST_ID: Final = "Jetinfer-Request-Id"
#: On a DLQ copy whose request did not fit beside its reasons under max_payload: the request's size in
#: bytes (the copy then carries the headers alone).
HEADER_DLQ_TRUNCATED: Final = "Jetinfer-Dlq-Truncated"

CONTENT_TYPE_MSGPACK: Final = "application/msgpack"
CONTENT_TYPE_JPEG: Final = "image/jpeg"
CONTENT_TYPE_PNG: Final = "image/png"
IMAGE_CONTENT_TYPES: Final = frozenset({CONTENT_TYPE_JPEG, CONTENT_TYPE_PNG})

MAX_NDIM: Final = 8
MAX_ID_LENGTH: Final = 256
MODEL_NAME_PATTERN: Final = re.compile(r"[a-z0-9_-]{1,64}")

#: Wire datatype name -> little-endian numpy dtype.
DATATYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: The Open Inference Protocol's variable-length datatype: one element per frame, each a 4-byte
#: little-endian length and then its bytes (here: encoded images, several frames in one message).
BYTES: Final = "BYTES"
_NAME_OF_KIND: Final = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}
#: The exact dtypes that go on the wire as they are (native byte order equals little-endian here or not).
_WIRE_NAME: Final[Mapping[np.dtype[Any], str]] = {dt: name for name, dt in DATATYPES.items()}


def datatype_of(dtype: npt.DTypeLike) -> str:
    """The wire datatype name of a numpy dtype (`float32` -> `FP32`)."""
    dt = np.dtype(dtype)
    try:
        return _NAME_OF_KIND[(dt.kind, dt.itemsize)]
    except KeyError:
        raise InvalidInputError(
            f"datatype {dt} has no wire equivalent; use one of {sorted(DATATYPES)}"
        ) from None


def check_model_name(name: str) -> str:
    """Return `name` if it is a valid model name (`[a-z0-9_-]{1,64}`), else raise InvalidInputError."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(f"invalid model name {name!r}: must match [a-z0-9_-]{{1,64}}")
    return name


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a decoder accepts; anything larger is refused before allocation."""

    max_bytes: int = 8 * 1024 * 1024
    max_inputs: int = 16
    max_ndim: int = MAX_NDIM


@dataclass(frozen=True)
class Tensor:
    """A named tensor on the wire: raw little-endian bytes in C order, first dimension the batch."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @classmethod
    def from_numpy(cls, name: str, array: npt.ArrayLike) -> Tensor:
        """Wrap a numpy array (converted to little-endian C order if needed)."""
        arr = np.asarray(array)
        wire = datatype_of(arr.dtype)
        arr = np.ascontiguousarray(arr, dtype=DATATYPES[wire])
        return cls(name=name, datatype=wire, shape=tuple(int(d) for d in arr.shape), data=arr.tobytes())

    @classmethod
    def from_bytes(cls, name: str, elements: Sequence[bytes]) -> Tensor:
        """A BYTES tensor of `elements` (shape [len(elements)]): length-prefixed, in order."""
        parts = [part for element in elements for part in (struct.pack("<I", len(element)), bytes(element))]
        return cls(name=name, datatype=BYTES, shape=(len(elements),), data=b"".join(parts))

    def elements(self) -> list[bytes]:
        """The elements of a BYTES tensor (validated by `from_wire`)."""
        data, out, offset = bytes(self.data), [], 0
        for _ in range(self.shape[0]):
            (length,) = struct.unpack_from("<I", data, offset)
            out.append(data[offset + 4 : offset + 4 + length])
            offset += 4 + length
        return out

    def to_numpy(self) -> npt.NDArray[Any]:
        """A read-only numpy view of the data (no copy). The tensor must have been validated."""
        return np.frombuffer(self.data, dtype=DATATYPES[self.datatype]).reshape(self.shape)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready map of this tensor."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape), "data": self.data}

    @classmethod
    def from_wire(cls, obj: object, *, limits: Limits, where: str) -> Tensor:
        """Validate a decoded tensor map: datatype known, shape sane, byte count exact."""
        if not isinstance(obj, dict):
            raise InvalidInputError(f"{where} must be a map, got {type(obj).__name__}")
        name = obj.get("name")
        datatype = obj.get("datatype")
        shape = obj.get("shape")
        data = obj.get("data")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise InvalidInputError(f"{where}.name must be a non-empty string of at most 128 characters")
        if not isinstance(datatype, str) or (datatype not in DATATYPES and datatype != BYTES):
            raise InvalidInputError(
                f"{where}.datatype {datatype!r} is not one of {sorted([*DATATYPES, BYTES])}"
            )
        if not isinstance(shape, list) or not shape:
            raise InvalidInputError(f"{where}.shape must be a non-empty list of integers")
        if len(shape) > limits.max_ndim:
            raise TooLargeError(f"{where}.shape has {len(shape)} dimensions; at most {limits.max_ndim}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidInputError(f"{where}.shape {shape!r} must hold non-negative integers")
        if not isinstance(data, bytes):
            raise InvalidInputError(f"{where}.data must be binary (msgpack bin), got {type(data).__name__}")
        if datatype == BYTES:
            _check_elements(data, shape, where)
            return cls(name=name, datatype=datatype, shape=tuple(shape), data=data)
        expected = math.prod(shape) * DATATYPES[datatype].itemsize
        if expected > limits.max_bytes:
            raise TooLargeError(
                f"{where} of shape {shape} needs {expected} bytes; at most {limits.max_bytes}"
            )
        if max(shape) > limits.max_bytes:  # only an empty tensor gets here: numpy could not shape it
            raise TooLargeError(f"{where}.shape {shape} has a dimension over {limits.max_bytes}")
        if expected != len(data):
            raise InvalidInputError(
                f"{where}: shape {shape} of {datatype} needs {expected} bytes, but data has {len(data)}"
            )
        if datatype == "BOOL" and data and np.frombuffer(data, dtype=np.uint8).max() > 1:
            raise InvalidInputError(f"{where}: BOOL data must hold only the bytes 0x00 and 0x01")
        return cls(name=name, datatype=datatype, shape=tuple(shape), data=data)


def _check_elements(data: bytes, shape: list[int], where: str) -> None:
    """A BYTES tensor's data holds exactly shape[0] length-prefixed elements, nothing more."""
    if len(shape) != 1:
        raise InvalidInputError(
            f"{where}: a BYTES tensor has one dimension (one element per frame), not {shape}"
        )
    offset = 0
    for index in range(shape[0]):
        if offset + 4 > len(data):
            raise InvalidInputError(f"{where}: BYTES data ends before element {index} of {shape[0]}")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4 + length
        if offset > len(data):
            raise InvalidInputError(
                f"{where}: BYTES element {index} says {length} bytes, past the data's end"
            )
    if offset != len(data):
        raise InvalidInputError(
            f"{where}: BYTES data has {len(data) - offset} bytes after its {shape[0]} elements"
        )


@dataclass(frozen=True)
class InferRequest:
    """An inference request: an id, named input tensors and scalar parameters."""

    id: str
    inputs: tuple[Tensor, ...]
    parameters: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        """Frames carried: the first dimension of the first input."""
        return self.inputs[0].shape[0] if self.inputs else 0


@dataclass(frozen=True)
class InferResponse:
    """A successful reply."""

    id: str
    model_name: str
    model_version: str
    outputs: tuple[Tensor, ...]
    timing: Mapping[str, float] = field(default_factory=dict)

    def output(self, name: str | None = None) -> npt.NDArray[Any]:
        """The named output as a numpy array (the first output if no name is given)."""
        for tensor in self.outputs:
            if name is None or tensor.name == name:
                return tensor.to_numpy()
        raise KeyError(f"no output named {name!r}; outputs are {[t.name for t in self.outputs]}")


@dataclass(frozen=True)
class ErrorReply:
    """A failed request: a wire error code and a human-readable message."""

    id: str
    code: str
    message: str


Reply = InferResponse | ErrorReply


def _reject_ext(code: int, data: bytes) -> object:
    raise InvalidInputError(f"msgpack extension type {code} is not allowed")


def _unpack(raw: bytes, limits: Limits) -> object:
    if len(raw) > limits.max_bytes + 64 * 1024:
        raise TooLargeError(f"message of {len(raw)} bytes is over the limit of {limits.max_bytes}")
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            use_list=True,
            max_str_len=64 * 1024,
            max_array_len=4096,
            max_map_len=256,
            max_ext_len=0,
        )
    except (InvalidInputError, TooLargeError):
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise InvalidInputError(f"body is not valid msgpack: {type(exc).__name__}: {exc}") from exc


def _scalar_parameters(obj: object) -> dict[str, str | int | float | bool]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise InvalidInputError("parameters must be a map of string to scalar")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"parameter names must be strings, got {type(key).__name__} {key!r:.64}")
        if not isinstance(value, str | int | float | bool):
            raise InvalidInputError(f"parameter {key!r} must be a scalar, got {type(value).__name__}")
    return obj


def _check_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(f"{where} must be a non-empty string of at most {MAX_ID_LENGTH} characters")
    return value


def encode_request(request: InferRequest) -> bytes:
    """Encode a request body (`application/msgpack`)."""
    body: dict[str, Any] = {"id": request.id, "inputs": [t.to_wire() for t in request.inputs]}
    if request.parameters:
        body["parameters"] = dict(request.parameters)
    return msgpack.packb(body, use_bin_type=True)


def decode_request(raw: bytes, *, limits: Limits = Limits()) -> InferRequest:
    """Decode and validate a request body. Raises InvalidInputError or TooLargeError."""
    obj = _unpack(raw, limits)
    if not isinstance(obj, dict):
        raise InvalidInputError(f"request body must be a msgpack map, got {type(obj).__name__}")
    request_id = _check_id(obj.get("id"), "id")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError("inputs must be a non-empty list of tensors")
    if len(inputs) > limits.max_inputs:
        raise TooLargeError(f"{len(inputs)} inputs; at most {limits.max_inputs}")
    tensors = tuple(Tensor.from_wire(t, limits=limits, where=f"inputs[{i}]") for i, t in enumerate(inputs))
    total = sum(len(t.data) for t in tensors)
    if total > limits.max_bytes:
        raise TooLargeError(f"inputs hold {total} bytes; at most {limits.max_bytes}")
    batches = {t.shape[0] for t in tensors}
    if len(batches) != 1:
        raise InvalidInputError(f"inputs disagree on the batch (first) dimension: {sorted(batches)}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"input names repeat: {names}")
    return InferRequest(id=request_id, inputs=tensors, parameters=_scalar_parameters(obj.get("parameters")))


def encode_response(response: InferResponse) -> bytes:
    """Encode a successful reply."""
    return msgpack.packb(
        {
            "id": response.id,
            "model_name": response.model_name,
            "model_version": response.model_version,
            "outputs": [t.to_wire() for t in response.outputs],
            "timing": dict(response.timing),
        },
        use_bin_type=True,
    )


def encode_outputs(
    request_id: str,
    model_name: str,
    model_version: str,
    outputs: Mapping[str, npt.NDArray[Any]],
    timing: Mapping[str, float],
) -> bytes:
    """Encode a successful reply straight from output arrays: the bytes `encode_response` gives, cheaper.

    The worker's reply path: no Tensor or InferResponse objects per reply. Arrays already in a wire
    dtype and C order are packed as they are; anything else goes through `Tensor.from_numpy`.
    """
    wire = []
    for name, array in outputs.items():
        datatype = _WIRE_NAME.get(array.dtype)
        if datatype is None or not array.flags.c_contiguous:
            wire.append(Tensor.from_numpy(name, array).to_wire())
        else:
            wire.append(
                {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.tobytes()}
            )
    return msgpack.packb(
        {
            "id": request_id,
            "model_name": model_name,
            "model_version": model_version,
            "outputs": wire,
            "timing": dict(timing),
        },
        use_bin_type=True,
    )


def encode_error(request_id: str, code: str, message: str) -> bytes:
    """Encode an error reply."""
    return msgpack.packb({"id": request_id, "error": {"code": code, "message": message}}, use_bin_type=True)


def decode_reply(raw: bytes, *, limits: Limits = Limits(max_bytes=256 * 1024 * 1024)) -> Reply:
    """Decode a reply (what a client receives): an InferResponse or an ErrorReply."""
    obj = _unpack(raw, limits)
    if not isinstance(obj, dict):
        raise InvalidInputError("reply must be a msgpack map")
    reply_id = obj.get("id")
    reply_id = reply_id if isinstance(reply_id, str) else ""
    error = obj.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise InvalidInputError("reply error must be a map")
        return ErrorReply(
            id=reply_id, code=str(error.get("code", "internal")), message=str(error.get("message", ""))
        )
    outputs = obj.get("outputs")
    if not isinstance(outputs, list):
        raise InvalidInputError("reply outputs must be a list")
    timing = obj.get("timing") or {}
    if isinstance(timing, dict) and not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in timing.values()
    ):
        raise InvalidInputError("reply timing values must be numbers")
    return InferResponse(
        id=reply_id,
        model_name=str(obj.get("model_name", "")),
        model_version=str(obj.get("model_version", "")),
        outputs=tuple(
            Tensor.from_wire(t, limits=limits, where=f"outputs[{i}]") for i, t in enumerate(outputs)
        ),
        timing={str(k): float(v) for k, v in timing.items()} if isinstance(timing, dict) else {},
    )


def request_headers(
    request_id: str,
    reply_to: str,
    *,
    content_type: str = CONTENT_TYPE_MSGPACK,
    deadline_ms: int | None = None,
) -> dict[str, str]:
    """The NATS headers of a request publish."""
    headers = {HEADER_MSG_ID: request_id, HEADER_REPLY_TO: reply_to, HEADER_CONTENT_TYPE: content_type}
    if deadline_ms is not None:
        headers[HEADER_DEADLINE] = str(int(deadline_ms))
    return headers
