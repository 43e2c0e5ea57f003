"""Batch jobs: every sampled frame of a video (or a folder of images) through a model, results in order.

A job publishes its frames with durable replies on the stream RESULTS (`results.<job>`), and reads
them back from there, so results survive the producer: re-running the same job id first reads what
is already answered and sends only the rest. Frame request ids are `<job>-<index>` (with a tenant:
`<job>-<tag>-<index>`, the tag a keyed hash of the job only this client's credential gives, see
`ids`), used as `Nats-Msg-Id`, so a frame sent again while its first copy still waits in INFER is
stored once, and no other tenant can publish one of them first.

    async with Client(url) as client:
        async for result in video_job(client, "efficientnet_lite0", read_frames(path), job="clip-1"):
            ...  # in frame order
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy

from jetinfer.cleanup import logged
from jetinfer.errors import InvalidInputError
from jetinfer.protocol import ErrorReply, InferResponse, decode_reply
from jetinfer.streams import RESULTS_STREAM, require_stream

from .client import Client
from .ids import new_request_id

__all__ = ["Frame", "FrameResult", "default_job_id", "read_frames", "result_line", "video_job"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its index in the job, its time in the source, and its encoded image."""

    index: int
    timestamp_s: float | None
    image: bytes


@dataclass(frozen=True)
class FrameResult:
    """A frame's reply (or error), in frame order."""

    index: int
    timestamp_s: float | None
    reply: InferResponse | None = None
    error: ErrorReply | None = None
    resumed: bool = False  # answered in an earlier run of the same job


def default_job_id(source: Path, model: str, every_n: int, fps: float | None, *, key: bytes = b"") -> str:
    """A job id that is the same for the same input, model and sampling, so a re-run resumes.

    With `key` (`ids.id_key` of the client's settings, for a tenant) it is a keyed hash, so another
    tenant, who sees job names in the stream's subjects, cannot tell which file a job reads.
    """
    stat = source.stat()
    text = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{model}|{every_n}|{fps}"
    if key:
        return "job-" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:16]
    return "job-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def read_frames(
    source: Path, *, every_n: int = 1, fps: float | None = None, quality: int = 90
) -> Iterator[Frame]:
    """Frames of a video file (OpenCV) or of a folder of images (sorted by name), sampled.

    `every_n` keeps every n-th frame; `fps` keeps frames at most that often (video files).
    """
    if every_n < 1:
        raise InvalidInputError("every_n must be at least 1")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise InvalidInputError(f"{source} holds no .jpg/.jpeg/.png images")
        for index, path in enumerate(files[::every_n]):
            yield Frame(index=index, timestamp_s=None, image=path.read_bytes())
        return
    if not source.is_file():
        raise InvalidInputError(f"{source}: no such file or folder")
    try:
        import cv2
    except ImportError:
        raise InvalidInputError("reading video files needs OpenCV: pip install 'jetinfer[video]'") from None
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise InvalidInputError(f"{source}: OpenCV cannot open it as a video")
    try:
        source_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        min_gap_s = 1.0 / fps if fps else 0.0
        last_kept = -1e18
        position = 0
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            timestamp = position / source_fps if source_fps > 0 else None
            keep = position % every_n == 0
            if keep and min_gap_s and timestamp is not None:
                keep = timestamp - last_kept >= min_gap_s - 1e-9
            if keep:
                encoded_ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not encoded_ok:
                    raise InvalidInputError(f"{source}: cannot encode frame {position} as JPEG")
                yield Frame(index=index, timestamp_s=timestamp, image=buffer.tobytes())
                index += 1
                if timestamp is not None:
                    last_kept = timestamp
            position += 1
    finally:
        capture.release()


def _frame_id(job: str, index: int, tag: str | None = None) -> str:
    return f"{job}-{index:08d}" if tag is None else f"{job}-{tag}-{index:08d}"


def _index_of(job: str, request_id: str, tag: str | None = None) -> int | None:
    prefix = f"{job}-" if tag is None else f"{job}-{tag}-"
    if not request_id.startswith(prefix):
        return None
    digits = request_id[len(prefix) :].split("~", 1)[0]
    return int(digits) if digits.isdigit() else None


async def video_job(
    client: Client,
    model: str,
    frames: Iterable[Frame],
    *,
    job: str,
    in_flight: int = 64,
    stall_timeout_s: float = 60.0,
    max_resends: int = 2,
) -> AsyncIterator[FrameResult]:
    """Run `frames` through `model` as job `job`; yield results in frame order.

    Frames already answered in RESULTS (an earlier run of the same job) are not sent again. A frame
    with no reply after `stall_timeout_s` of no progress is sent again (its reply was lost), at most
    `max_resends` times, then reported as a `deadline_exceeded` error.
    """
    if not job or any(c in job for c in " .*>"):
        raise InvalidInputError(f"job id {job!r} must be a non-empty token without spaces, '.', '*' or '>'")
    subject = client.results_subject(job)
    tag = client.id_tag(job)
    # Workers create the streams with the deployment's settings; a producer only checks that RESULTS is there.
    await require_stream(
        client.js, RESULTS_STREAM, "start a worker first (it creates INFER, RESULTS and DLQ)"
    )
    frame_list = list(frames)
    timestamps = {f.index: f.timestamp_s for f in frame_list}
    replies: dict[int, InferResponse | ErrorReply] = {}
    arrived = asyncio.Event()

    async def on_result(msg: Any) -> None:
        try:
            reply = decode_reply(msg.data)
        except Exception as exc:
            logger.warning("job %s: unreadable result: %s", job, exc)
            return
        index = _index_of(job, reply.id, tag)
        if index is not None and index in timestamps and index not in replies:
            replies[index] = reply
            arrived.set()

    # A named consumer: its create subject then carries the filter, which is what lets the server allow
    # a tenant consumers on its own results only (docs/operations.md, Tenants); stream= spares a
    # look-up producers may not make.
    named = ConsumerConfig(name=f"{job}-{new_request_id()[:16]}") if client.tenant else None
    subscription = await client.js.subscribe(
        subject,
        stream=RESULTS_STREAM,
        config=named,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=on_result,
    )
    try:
        info = await client.js.stream_info("RESULTS", subjects_filter=subject)
        stored = (info.state.subjects or {}).get(subject, 0) if info.state else 0
        deadline = time.monotonic() + 10
        while len(replies) < min(stored, len(frame_list)) and time.monotonic() < deadline:
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), 0.5)
        already = set(replies)
        pending = [f for f in frame_list if f.index not in already]
        logger.info(
            "job %s: %d frames, %d answered before, %d to send",
            job,
            len(frame_list),
            len(already),
            len(pending),
        )
        sender = asyncio.create_task(_send(client, model, pending, job, tag, subject, replies, in_flight))
        next_index = 0
        resends = 0
        last_progress = time.monotonic()
        try:
            while next_index < len(frame_list):
                while next_index < len(frame_list) and frame_list[next_index].index in replies:
                    frame = frame_list[next_index]
                    reply = replies[frame.index]
                    yield FrameResult(
                        index=frame.index,
                        timestamp_s=timestamps[frame.index],
                        reply=reply if isinstance(reply, InferResponse) else None,
                        error=reply if isinstance(reply, ErrorReply) else None,
                        resumed=frame.index in already,
                    )
                    next_index += 1
                    last_progress = time.monotonic()
                if next_index >= len(frame_list):
                    break
                arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 1.0)
                if sender.done() and sender.exception() is not None:
                    raise sender.exception()  # type: ignore[misc]
                if sender.done() and time.monotonic() - last_progress > stall_timeout_s:
                    missing = [f for f in frame_list[next_index:] if f.index not in replies]
                    if resends >= max_resends:
                        for frame in missing:
                            replies[frame.index] = ErrorReply(
                                _frame_id(job, frame.index, tag),
                                "deadline_exceeded",
                                f"no reply after {max_resends + 1} sends",
                            )
                        continue
                    resends += 1
                    logger.warning(
                        "job %s: no progress for %.0f s; sending %d unanswered frames again",
                        job,
                        stall_timeout_s,
                        len(missing),
                    )
                    sender = asyncio.create_task(
                        _send(client, model, missing, job, tag, subject, replies, in_flight, attempt=resends)
                    )
                    last_progress = time.monotonic()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
    finally:
        await logged(logger, f"job {job}: unsubscribing from its results", subscription.unsubscribe())


async def _send(
    client: Client,
    model: str,
    frames: list[Frame],
    job: str,
    tag: str | None,
    subject: str,
    replies: dict[int, Any],
    in_flight: int,
    attempt: int = 0,
) -> None:
    """Publish frames, keeping at most `in_flight` unanswered (the stream stores replies meanwhile)."""
    sent: list[int] = []
    for frame in frames:
        while sum(1 for i in sent if i not in replies) >= in_flight:
            await asyncio.sleep(0.002)
            sent = [i for i in sent if i not in replies]
        if frame.index in replies:
            continue
        # A resend gets a new id: the same id inside the duplicate window would be dropped by JetStream.
        request_id = _frame_id(job, frame.index, tag) + (f"~r{attempt}" if attempt else "")
        await client.publish(model, frame.image, request_id=request_id, reply_to=subject)
        sent.append(frame.index)


def result_line(result: FrameResult, labels: tuple[str, ...], k: int) -> str:
    """One JSON line for a frame: index, timestamp, and top-k labels (classifiers) or output summaries."""
    from jetinfer.labels import top_k

    line: dict[str, Any] = {"index": result.index, "timestamp_s": result.timestamp_s}
    if result.error is not None:
        line["error"] = {"code": result.error.code, "message": result.error.message}
        return json.dumps(line)
    assert result.reply is not None
    line["model_version"] = result.reply.model_version
    first = result.reply.outputs[0].to_numpy()
    if first.ndim == 2 and first.shape[1] in (1000, 1001):
        line["top_k"] = [
            {"index": p.index, "label": p.label, "score": round(p.score, 6)}
            for p in top_k(first[0], labels, k)
        ]
    else:
        line["outputs"] = {
            t.name: {
                "shape": list(t.shape),
                "mean": float(t.to_numpy().mean()),
                "min": float(t.to_numpy().min()),
                "max": float(t.to_numpy().max()),
            }
            for t in result.reply.outputs
        }
    return json.dumps(line)
