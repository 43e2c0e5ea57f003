"""Batch jobs: every sampled frame of a video (or a folder of images) through a model, results in order.

A job publishes its frames with durable replies on the stream RESULTS (`results.<job>`), and reads
them back from there, so results survive the producer: re-running the same job id first reads what
is already answered and sends only the rest. Frame request ids are `<job>-<index>` (with a tenant:
`<job>-<tag>-<index>`, the tag a keyed hash of the job only this client's credential gives, see
`ids`), used as `Nats-Msg-Id`, so a frame sent again while its first copy still waits in INFER is
stored once, and no other tenant can publish one of them first.

Frames stream: each is read (from a thread, so decoding never blocks the event loop), sent and
answered while the next ones are still being read, with at most `in_flight` unanswered. Every wait
has a bound: when no reply comes for `stall_timeout_s` while frames wait for one (nobody serves the
model), the job stops with `JobStalledError` saying what it waited for; running it again resumes.

    async with Client(url) as client:
        async for result in video_job(client, "efficientnet_lite0", read_frames(path), job="clip-1"):
            ...  # in frame order
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy

from jetinfer.cleanup import logged
from jetinfer.errors import InvalidInputError, JobStalledError
from jetinfer.protocol import ErrorReply, InferResponse, Tensor, decode_reply
from jetinfer.streams import RESULTS_STREAM, require_stream

from .client import Client
from .frames import Frame, count_frames, default_job_id, read_frames
from .ids import new_request_id

__all__ = [
    "Frame",
    "FrameResult",
    "JobProgress",
    "count_frames",
    "default_job_id",
    "read_frames",
    "result_line",
    "video_job",
]

logger = logging.getLogger(__name__)

#: How long a job waits for the answers an earlier run left in RESULTS, at most.
_RESUME_READ_S = 10.0


@dataclass(frozen=True)
class FrameResult:
    """A frame's reply (or error), in frame order."""

    index: int
    timestamp_s: float | None
    reply: InferResponse | None = None
    error: ErrorReply | None = None
    resumed: bool = False  # answered in an earlier run of the same job
    source: str | None = None  # the file of a folder's frame


@dataclass
class JobProgress:
    """What a running job has done so far (read by the CLI after an interruption)."""

    read: int = 0
    sent: int = 0
    answered: int = 0
    resumed: int = 0
    reading_done: bool = False


def _frame_id(job: str, index: int, tag: str | None = None, count: int = 1) -> str:
    """`<job>[-<tag>]-<index>`, and `+<count>` for a message of `count` frames from `index` on."""
    first = f"{job}-{index:08d}" if tag is None else f"{job}-{tag}-{index:08d}"
    return first if count == 1 else f"{first}+{count}"


def _indices_of(job: str, request_id: str, tag: str | None = None) -> range | None:
    """The frames a reply's request id stands for (None: not this job's)."""
    prefix = f"{job}-" if tag is None else f"{job}-{tag}-"
    if not request_id.startswith(prefix):
        return None
    first, _, count = request_id[len(prefix) :].split("~", 1)[0].partition("+")
    if not first.isdigit() or not (count or "1").isdigit():
        return None
    return range(int(first), int(first) + int(count or "1"))


def _frame_reply(reply: InferResponse, row: int) -> InferResponse:
    """Frame `row` of a reply to a message of several frames."""
    outputs = tuple(Tensor.from_numpy(t.name, t.to_numpy()[row : row + 1]) for t in reply.outputs)
    return InferResponse(reply.id, reply.model_name, reply.model_version, outputs, reply.timing)


async def _each(frames: Iterable[Frame] | AsyncIterable[Frame]) -> AsyncIterator[Frame]:
    """The frames one at a time; a plain iterable is advanced in a thread (reading may decode video)."""
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
        return
    iterator: Iterator[Frame] = iter(frames)

    def advance() -> Frame | None:
        return next(iterator, None)

    while (item := await asyncio.to_thread(advance)) is not None:
        yield item


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (the first few ranges)."""
    parts: list[str] = []
    start = previous = indices[0]
    for index in [*indices[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ", ".join(parts[:4]) + (", ..." if len(parts) > 4 else "")


class _Job:
    """The state one run of a job shares between its reader/sender task and its in-order results."""

    def __init__(
        self,
        client: Client,
        model: str,
        job: str,
        in_flight: int,
        progress: JobProgress,
        per_message: int = 1,
    ) -> None:
        self.client = client
        self.model = model
        self.job = job
        self.subject = client.results_subject(job)
        self.tag = client.id_tag(job)
        self.in_flight = in_flight
        self.progress = progress
        self.replies: dict[int, InferResponse | ErrorReply] = {}
        self.earlier: set[int] = set()
        self.known: dict[int, Frame] = {}  # frames read and not yet yielded, without their images
        self.order: deque[int] = deque()  # their indices, in the order they were read
        self.outstanding: set[int] = set()  # sent, not answered
        self.changed = asyncio.Event()
        self.last_progress = time.monotonic()
        self.per_message = per_message
        self.grouped: list[Frame] = []  # read, to be sent together in the next message
        self.split: set[str] = set()  # request ids of messages whose frames were sent again one by one
        self.regroup: list[int] = []  # frames of such a message still to be sent alone
        self.images: dict[int, bytes] = {}  # the images of frames sent in messages of several
        self.results_read = 0  # messages of this job's subject read from RESULTS, whatever they held

    async def on_result(self, msg: Any) -> None:
        """Take one message of this job's subject from RESULTS (an answer, or not this job's)."""
        self.results_read += 1
        self._take(msg)
        self.changed.set()

    def _take(self, msg: Any) -> None:
        try:
            reply = decode_reply(msg.data)
        except Exception as exc:
            logger.warning("job %s: unreadable result: %s", self.job, exc)
            return
        indices = _indices_of(self.job, reply.id, self.tag)
        if indices is None or all(index in self.replies for index in indices):
            return
        if len(indices) > 1 and isinstance(reply, ErrorReply) and reply.id not in self.split:
            # One bad frame fails its whole message: send its frames again one by one, so only it fails.
            self.split.add(reply.id)
            self.regroup.extend(i for i in indices if i in self.outstanding)
        else:
            several = len(indices) > 1 and isinstance(reply, InferResponse)
            for row, index in enumerate(indices):
                self.replies.setdefault(index, _frame_reply(reply, row) if several else reply)  # type: ignore[arg-type]
                self.outstanding.discard(index)
                self.images.pop(index, None)
        self.last_progress = time.monotonic()

    async def read_earlier_answers(self, timeout_s: float) -> None:
        """Wait (bounded) until the answers RESULTS holds for this job have arrived."""
        info = await self.client.js.stream_info(RESULTS_STREAM, subjects_filter=self.subject)
        stored = (info.state.subjects or {}).get(self.subject, 0) if info.state else 0
        deadline = time.monotonic() + timeout_s
        # Counted in messages, not frames: one message may answer several frames.
        while self.results_read < stored and time.monotonic() < deadline:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.5)
        if self.results_read < stored:
            logger.warning(
                "job %s: read %d of the %d answers RESULTS holds within %g s; sending the rest again",
                self.job,
                self.results_read,
                stored,
                timeout_s,
            )
        self.earlier = set(self.replies)

    async def send(self, frames: Iterable[Frame] | AsyncIterable[Frame]) -> None:
        """Read the frames one at a time and publish each, keeping at most `in_flight` unanswered."""
        async for frame in _each(frames):
            self.progress.read += 1
            self.known[frame.index] = Frame(frame.index, frame.timestamp_s, b"", frame.source, frame.problem)
            self.order.append(frame.index)
            if frame.index in self.replies:
                self.changed.set()
                continue
            if frame.problem is not None:  # no image: answered here, never sent
                where = frame.source or f"frame {frame.index}"
                self.replies[frame.index] = ErrorReply(
                    _frame_id(self.job, frame.index, self.tag), "invalid_input", f"{where}: {frame.problem}"
                )
                self.changed.set()
                continue
            if self.grouped and self.grouped[-1].index + 1 != frame.index:
                await self._flush()  # a message holds consecutive frames only
            self.grouped.append(frame)
            if len(self.grouped) >= self.per_message:
                await self._flush()
        await self._flush()
        self.progress.reading_done = True
        self.changed.set()
        while self.outstanding:  # frames of a failed message, sent again alone
            await self._resend_alone()
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)

    async def _flush(self) -> None:
        """Publish the frames gathered so far, one message (several frames: one BYTES input)."""
        frames, self.grouped = self.grouped, []
        if not frames:
            return
        while len(self.outstanding) >= self.in_flight:
            await self._resend_alone()
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)
        if not self.outstanding:
            self.last_progress = time.monotonic()  # waiting for a reply starts now
        self.outstanding.update(f.index for f in frames)
        request_id = _frame_id(self.job, frames[0].index, self.tag, len(frames))
        payload: bytes | list[bytes]
        if len(frames) == 1:
            payload = frames[0].image
        else:
            payload = [f.image for f in frames]
            self.images.update((f.index, f.image) for f in frames)
        await self.client.publish(self.model, payload, request_id=request_id, reply_to=self.subject)
        self.progress.sent += len(frames)

    async def _resend_alone(self) -> None:
        """Send the frames of failed several-frame messages again, each alone (new ids: `~a`)."""
        while self.regroup:
            index = self.regroup.pop()
            image = self.images.pop(index, None)
            if image is None or index in self.replies:
                continue
            request_id = _frame_id(self.job, index, self.tag) + "~a"
            await self.client.publish(self.model, image, request_id=request_id, reply_to=self.subject)

    def stalled(self, timeout_s: float) -> JobStalledError | None:
        """The error to stop with when frames wait for replies and none came for `timeout_s`."""
        waiting = sorted(self.outstanding)
        if not waiting or time.monotonic() - self.last_progress <= timeout_s:
            return None
        what = (
            f"the replies to frames {_ranges(waiting)} ({len(waiting)} sent, unanswered) from model "
            f"{self.model} on {self.subject}: is a worker serving {self.model}?"
        )
        return JobStalledError(self.job, timeout_s, what, self.progress.answered)


async def video_job(
    client: Client,
    model: str,
    frames: Iterable[Frame] | AsyncIterable[Frame],
    *,
    job: str,
    in_flight: int = 64,
    stall_timeout_s: float = 60.0,
    progress: JobProgress | None = None,
    frames_per_message: int = 1,
) -> AsyncIterator[FrameResult]:
    """Run `frames` through `model` as job `job`; yield results in frame order, as they come.

    Frames already answered in RESULTS (an earlier run of the same job) are not sent again. When frames
    wait for replies and none comes for `stall_timeout_s`, raises `JobStalledError` (the job resumes
    when run again). `progress`, where given, is kept up to date. `frames_per_message` > 1 sends that
    many consecutive frames in one message (a BYTES input): fewer messages for the same frames; a
    message that fails is sent again frame by frame, so one bad frame fails alone.
    """
    if not job or any(c in job for c in " .*>"):
        raise InvalidInputError(f"job id {job!r} must be a non-empty token without spaces, '.', '*' or '>'")
    if in_flight < 1 or frames_per_message < 1:
        raise InvalidInputError("in_flight and frames_per_message must be at least 1")
    progress = progress if progress is not None else JobProgress()
    # A message never holds more frames than may be unanswered at once.
    state = _Job(client, model, job, in_flight, progress, min(frames_per_message, in_flight))
    # Workers create the streams with the deployment's settings; a producer only checks that RESULTS is there.
    await require_stream(
        client.js, RESULTS_STREAM, "start a worker first (it creates INFER, RESULTS and DLQ)"
    )
    # A named consumer: its create subject then carries the filter, which is what lets the server allow
    # a tenant consumers on its own results only (docs/operations.md, Tenants); stream= spares a
    # look-up producers may not make.
    named = ConsumerConfig(name=f"{job}-{new_request_id()[:16]}") if client.tenant else None
    subscription = await client.js.subscribe(
        state.subject,
        stream=RESULTS_STREAM,
        config=named,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=state.on_result,
    )
    try:
        await state.read_earlier_answers(min(_RESUME_READ_S, stall_timeout_s))
        logger.info("job %s: %d frames answered before", job, len(state.earlier))
        sender = asyncio.create_task(state.send(frames), name=f"job-{job}-sender")
        try:
            while True:
                while state.order and state.order[0] in state.replies:
                    index = state.order.popleft()
                    reply = state.replies[index]
                    frame = state.known.pop(index)
                    resumed = index in state.earlier
                    progress.answered += 1
                    progress.resumed += resumed
                    yield FrameResult(
                        index=index,
                        timestamp_s=frame.timestamp_s,
                        reply=reply if isinstance(reply, InferResponse) else None,
                        error=reply if isinstance(reply, ErrorReply) else None,
                        resumed=resumed,
                        source=frame.source,
                    )
                if sender.done():
                    if sender.exception() is not None:
                        raise sender.exception()  # type: ignore[misc]
                    if not state.order:
                        return  # every frame read was answered
                stalled = state.stalled(stall_timeout_s)
                if stalled is not None:
                    raise stalled
                state.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.changed.wait(), 1.0)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
    finally:
        await logged(logger, f"job {job}: unsubscribing from its results", subscription.unsubscribe())


def result_line(result: FrameResult, labels: tuple[str, ...], k: int) -> str:
    """One JSON line for a frame: index, timestamp, file (a folder's frames), and top-k labels
    (classifiers), output summaries, or the error."""
    from jetinfer.labels import top_k

    line: dict[str, Any] = {"index": result.index, "timestamp_s": result.timestamp_s}
    if result.source is not None:
        line["file"] = result.source
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
