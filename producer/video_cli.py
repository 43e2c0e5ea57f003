"""`jetinfer video`: a video file or a folder of images as one resumable job, results in frame order.

Frames stream from the source (read, sent and answered as they come, with the progress bar moving
from the first one); results are written, one JSON line per frame, when the job ends. A frame that
fails (a folder's file that is no image, a truncated JPEG) is one line on stderr naming its file, and
the job goes on. A job that gets no reply for `--timeout-s`, or is interrupted, says how far it got and
that re-running the same command resumes it.

Exit status: 0 every frame answered; 1 some frames were answered with an error; 2 bad usage or setup;
3 the job stopped waiting for replies (`--timeout-s`); 130 interrupted. After 3 and 130, running the
same command again resumes the job.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from jetinfer.errors import JobStalledError
from jetinfer.labels import imagenet_labels
from jetinfer.settings import add_arguments, load_settings

from .cli_settings import VideoSettings
from .client import Client
from .ids import id_key
from .video import FrameResult, JobProgress, count_frames, default_job_id, read_frames, result_line, video_job

__all__ = ["register_video"]

#: Exit status of a job that stopped waiting for replies (re-running resumes it).
EXIT_STALLED = 3
EXIT_INTERRUPTED = 130


def register_video(subparsers: Any) -> None:
    """Add the `video` subcommand."""
    video: argparse.ArgumentParser = subparsers.add_parser(
        "video",
        help="run every sampled frame of a video (or a folder of images) through a model, in order",
        description="Publish sampled frames as one job with durable replies on RESULTS (results.<job>), "
        "collect them in frame order and write one JSON line per frame, then a summary. Re-running the same "
        "job (same input, model and sampling, or the same --job) resumes: answered frames are not sent "
        "again.",
        epilog="Exit status: 0 every frame answered; 1 some frames answered with an error (one stderr line "
        "each, naming the frame's file); 2 bad usage or setup; 3 no reply for --timeout-s (nobody serving "
        "the model?); 130 interrupted. After 3 and 130, run the same command again to resume.",
    )
    video.add_argument("input", metavar="INPUT", type=Path, help="video file (OpenCV) or folder of .jpg/.png")
    add_arguments(video, VideoSettings, skip=frozenset({"concurrency"}))
    video.set_defaults(handler=_video_command)


def _video_command(args: argparse.Namespace) -> int:
    settings = load_settings(VideoSettings, args)
    source: Path = args.input
    if not source.exists():
        print(f"jetinfer video: error: no such file or folder: {source}", file=sys.stderr)
        return 2
    assert settings.model is not None
    key = id_key(settings) if settings.tenant else b""
    job = settings.job or default_job_id(source, settings.model, settings.every_n, settings.fps, key=key)
    labels = tuple(settings.labels.read_text().splitlines()) if settings.labels else imagenet_labels()
    progress = JobProgress()
    try:
        return asyncio.run(_video(settings, source, job, labels, progress))
    except JobStalledError as exc:
        print(f"jetinfer video: {exc}", file=sys.stderr)
        return EXIT_STALLED
    except KeyboardInterrupt:
        print(
            f"jetinfer video: interrupted: job {job}: {progress.answered} frames answered, "
            f"{progress.sent} sent in this run; nothing written to {settings.out}. Re-run the same command "
            "to resume (answered frames are not sent again)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _error_line(result: FrameResult) -> str:
    assert result.error is not None
    where = f"frame {result.index}" + (f" ({result.source})" if result.source else "")
    message = result.error.message
    if result.source and result.source not in message:
        message = f"{result.source}: {message}"
    return f"jetinfer video: {where}: error {result.error.code}: {message}"


async def _video(
    settings: VideoSettings, source: Path, job: str, labels: tuple[str, ...], progress: JobProgress
) -> int:
    from tqdm import tqdm

    assert settings.model is not None
    assert settings.out is not None
    out = settings.out
    started = time.perf_counter()
    errors = 0
    total = await asyncio.to_thread(count_frames, source, every_n=settings.every_n, fps=settings.fps)
    bar = tqdm(
        total=total,
        desc=f"job {job}",
        unit="frame",
        file=sys.stderr,
        disable=None if settings.progress else True,  # None: drawn on a terminal only
    )
    lines: list[str] = []
    try:
        async with Client(settings=settings) as client:
            frames = read_frames(source, every_n=settings.every_n, fps=settings.fps)
            async for result in video_job(
                client,
                settings.model,
                frames,
                job=job,
                in_flight=settings.in_flight,
                stall_timeout_s=settings.timeout_s,
                progress=progress,
                frames_per_message=settings.frames_per_message,
            ):
                lines.append(result_line(result, labels, settings.top_k) + "\n")
                if result.error is not None:
                    errors += 1
                    bar.write(_error_line(result), file=sys.stderr)
                bar.update()
    finally:
        bar.close()
    tmp = out.with_name(f".{out.name}.tmp")
    await asyncio.to_thread(tmp.write_text, "".join(lines), encoding="utf-8")
    tmp.replace(out)
    elapsed = time.perf_counter() - started
    count, resumed = progress.answered, progress.resumed
    sent = count - resumed
    print(
        f"job {job}: {count} frames ({resumed} answered in an earlier run, {sent} sent now), "
        f"{errors} errors, {sent / elapsed if elapsed else 0:.1f} frames/s, {elapsed:.1f} s -> {out}"
    )
    return 1 if errors else 0
