"""The link between a worker's engine process and one of its front processes, and what crosses it.

A front process pulls, prepares and answers requests on a NATS connection of its own; the engine process
runs their batches. They talk over a socket pair: each message is one msgpack map (its type under "t",
arrays as dtype, shape and bytes) after its length (8 bytes, big-endian); nothing is unpickled, here
as anywhere in jetinfer. What crosses, and which way:

- engine → front: `Hello` (the settings, first), `Serve` (start serving a model, or its new config after a
  reload), `BatchDone` (a batch's outcomes), `Stop`;
- front → engine: `FrontState` (connected, and the models served), `RunBatch`, `MetricsSnapshot`.

A request's images cross still encoded, its tensors as arrays; its message (the NATS delivery) stays in
the front, which alone settles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

from jetinfer.errors import RequestError, error_for_code
from jetinfer.repository import ModelConfig
from jetinfer.settings import load_settings

from .autoconfig import Plan
from .settings import WorkerSettings

__all__ = [
    "BatchDone",
    "FrontState",
    "Hello",
    "Link",
    "LinkClosedError",
    "MetricsSnapshot",
    "RemoteRequest",
    "RunBatch",
    "Serve",
    "Stop",
    "WireError",
]

_LENGTH: Final = struct.Struct(">Q")
#: The largest message either side accepts (a batch of images at the largest request size is far less).
MAX_MESSAGE_BYTES: Final = 1 << 31


class LinkClosedError(ConnectionError):
    """The other process closed its end (it stopped, or died)."""


@dataclass(frozen=True, slots=True)
class Hello:
    """The engine's first message: what the front needs to connect and serve as this worker."""

    settings: WorkerSettings
    front: int  # this front's number, 1..K
    log_level: int


@dataclass(frozen=True, slots=True)
class Serve:
    """Serve `model` (or go on with this config after a reload)."""

    model: str
    config: ModelConfig
    max_batch: int
    plan: Plan


@dataclass(frozen=True, slots=True)
class RemoteRequest:
    """What the engine needs of one prepared request to run it."""

    request_id: str
    enqueued_at: float
    deadline_s: float | None
    frames: int
    content_type: str
    encoded: tuple[bytes, ...]
    inputs: dict[str, npt.NDArray[Any]]
    pixels: bool


@dataclass(frozen=True, slots=True)
class RunBatch:
    """A front's batch, for the engine to run."""

    model: str
    batch_id: int
    requests: tuple[RemoteRequest, ...]


@dataclass(frozen=True, slots=True)
class WireError:
    """A request's error as it crosses: its wire code and message."""

    code: str
    message: str

    @classmethod
    def of(cls, error: RequestError) -> WireError:
        """The crossing form of `error`."""
        return cls(error.code, error.message)

    def error(self) -> RequestError:
        """The request error this stands for."""
        return error_for_code(self.code, self.message)


@dataclass(frozen=True, slots=True)
class BatchDone:
    """A batch's outcomes, per request in order: outputs by name, or the error that ended it."""

    batch_id: int
    version: str
    started_at: float
    infer_s: float
    results: tuple[dict[str, npt.NDArray[Any]] | WireError, ...]


@dataclass(frozen=True, slots=True)
class FrontState:
    """A front's state, sent when it changes."""

    connected: bool
    serving: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """A front's metric families (prometheus_client's `Metric` objects), for the engine's /metrics."""

    #: (name, type, documentation, samples): each sample (name, labels, value).
    families: tuple[tuple[str, str, str, tuple[tuple[str, dict[str, str], float], ...]], ...]


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop serving within `grace_s`: finish the batches in flight, give back the rest, and exit."""

    grace_s: float


class Link:
    """One end of the socket pair, on this process's event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._sending = asyncio.Lock()

    @classmethod
    async def open(cls, sock: socket.socket) -> Link:
        """The link over `sock` (one end of a socket pair)."""
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, message: object) -> None:
        """Send one message (waits while the other side's buffer is full). Raises LinkClosedError."""
        data = msgpack.packb(encode(message), use_bin_type=True)
        async with self._sending:
            if self._writer.is_closing():
                raise LinkClosedError("the link is closed")
            self._writer.write(_LENGTH.pack(len(data)))
            self._writer.write(data)
            try:
                await self._writer.drain()
            except (ConnectionError, BrokenPipeError) as exc:
                raise LinkClosedError(f"the other process closed the link: {exc}") from exc

    async def receive(self) -> object:
        """The next message. Raises LinkClosedError at the end of the stream."""
        try:
            head = await self._reader.readexactly(_LENGTH.size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise LinkClosedError("the other process closed the link") from exc
        (length,) = _LENGTH.unpack(head)
        if length > MAX_MESSAGE_BYTES:
            raise LinkClosedError(f"a message of {length} bytes: not a jetinfer link")
        try:
            data = await self._reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise LinkClosedError("the other process closed the link") from exc
        return decode(msgpack.unpackb(data, raw=False, ext_hook=_refuse_ext, strict_map_key=False))

    async def close(self) -> None:
        """Close this end (the other side's `receive` then raises LinkClosedError)."""
        self._writer.close()
        with contextlib.suppress(ConnectionError):  # the other end went first: nothing of ours to flush
            await self._writer.wait_closed()


# -- the wire form ---------------------------------------------------------------------------------------


def _refuse_ext(code: int, data: bytes) -> object:
    raise LinkClosedError(f"msgpack extension type {code} on the front link: not a jetinfer link")


def _array(array: npt.NDArray[Any]) -> list[Any]:
    contiguous = np.ascontiguousarray(array)
    return [contiguous.dtype.str, list(contiguous.shape), contiguous.tobytes()]


def _from_array(raw: list[Any]) -> npt.NDArray[Any]:
    dtype, shape, data = raw
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def _arrays(arrays: dict[str, npt.NDArray[Any]]) -> dict[str, list[Any]]:
    return {name: _array(array) for name, array in arrays.items()}


def _from_arrays(raw: dict[str, list[Any]]) -> dict[str, npt.NDArray[Any]]:
    return {name: _from_array(array) for name, array in raw.items()}


def _settings(settings: WorkerSettings) -> dict[str, Any]:
    return {
        f.name: str(value) if isinstance(value, Path) else value
        for f in dataclasses.fields(settings)
        if f.init
        for value in [getattr(settings, f.name)]
    }


def _from_settings(raw: dict[str, Any]) -> WorkerSettings:
    # The one loader of settings turns the values back into their types (and checks them again); the
    # front reads no environment of its own.
    return load_settings(WorkerSettings, raw, environ={})


def _plan(plan: Plan) -> dict[str, Any]:
    return {**dataclasses.asdict(plan), "reasons": list(plan.reasons)}


def _from_plan(raw: dict[str, Any]) -> Plan:
    return Plan(**{**raw, "reasons": tuple(raw["reasons"])})


def _config(config: ModelConfig) -> dict[str, Any]:
    return {"config": config.to_dict(), "labels": list(config.labels)}


def _from_config(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(raw["config"], where="the engine's config", labels=raw["labels"])


def _request(request: RemoteRequest) -> list[Any]:
    return [
        request.request_id,
        request.enqueued_at,
        request.deadline_s,
        request.frames,
        request.content_type,
        list(request.encoded),
        _arrays(request.inputs),
        request.pixels,
    ]


def _from_request(raw: list[Any]) -> RemoteRequest:
    request_id, enqueued_at, deadline_s, frames, content_type, encoded, inputs, pixels = raw
    return RemoteRequest(
        request_id,
        enqueued_at,
        deadline_s,
        frames,
        content_type,
        tuple(encoded),
        _from_arrays(inputs),
        pixels,
    )


def _result(result: dict[str, npt.NDArray[Any]] | WireError) -> Any:
    if isinstance(result, WireError):
        return [result.code, result.message]
    return _arrays(result)


def _from_result(raw: Any) -> dict[str, npt.NDArray[Any]] | WireError:
    if isinstance(raw, list):
        return WireError(raw[0], raw[1])
    return _from_arrays(raw)


_ENCODERS: Final[dict[type, tuple[str, Callable[[Any], dict[str, Any]]]]] = {
    Hello: ("hello", lambda m: {"s": _settings(m.settings), "f": m.front, "l": m.log_level}),
    Serve: (
        "serve",
        lambda m: {"m": m.model, "c": _config(m.config), "b": m.max_batch, "p": _plan(m.plan)},
    ),
    RunBatch: ("run", lambda m: {"m": m.model, "i": m.batch_id, "r": [_request(r) for r in m.requests]}),
    BatchDone: (
        "done",
        lambda m: {
            "i": m.batch_id,
            "v": m.version,
            "s": m.started_at,
            "d": m.infer_s,
            "r": [_result(r) for r in m.results],
        },
    ),
    FrontState: ("state", lambda m: {"c": m.connected, "m": list(m.serving)}),
    MetricsSnapshot: (
        "metrics",
        lambda m: {"f": [[n, t, d, [list(sample) for sample in samples]] for n, t, d, samples in m.families]},
    ),
    Stop: ("stop", lambda m: {"g": m.grace_s}),
}

_DECODERS: Final[dict[str, Callable[[dict[str, Any]], object]]] = {
    "hello": lambda r: Hello(_from_settings(r["s"]), r["f"], r["l"]),
    "serve": lambda r: Serve(r["m"], _from_config(r["c"]), r["b"], _from_plan(r["p"])),
    "run": lambda r: RunBatch(r["m"], r["i"], tuple(_from_request(q) for q in r["r"])),
    "done": lambda r: BatchDone(r["i"], r["v"], r["s"], r["d"], tuple(_from_result(x) for x in r["r"])),
    "state": lambda r: FrontState(r["c"], tuple(r["m"])),
    "metrics": lambda r: MetricsSnapshot(
        tuple((n, t, d, tuple((s[0], s[1], s[2]) for s in samples)) for n, t, d, samples in r["f"])
    ),
    "stop": lambda r: Stop(r["g"]),
}


def encode(message: object) -> dict[str, Any]:
    """The msgpack-ready form of one link message."""
    tag, encoder = _ENCODERS[type(message)]
    return {"t": tag, **encoder(message)}


def decode(raw: object) -> object:
    """The link message `raw` (as unpacked) stands for. Raises LinkClosedError for anything else."""
    if not isinstance(raw, dict) or raw.get("t") not in _DECODERS:
        raise LinkClosedError("a message the front link does not know: not a jetinfer link")
    return _DECODERS[raw["t"]](raw)
