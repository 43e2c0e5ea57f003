"""`jetinfer infer`: classify images (top-5 labels) or run tensors (.npy) through a served model."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jetinfer.errors import RequestError, RequestTimeoutError
from jetinfer.labels import imagenet_labels, top_k
from jetinfer.settings import add_arguments, load_settings

from .cli_settings import InferSettings, VideoSettings
from .client import Client
from .files import check_request_file

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the producer subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "infer",
        help="send images or .npy tensors to a model and print the results",
        description="Send each FILE (.jpg/.jpeg/.png as an image, .npy as a tensor) to MODEL. Classifier "
        "outputs (1000 classes) print the top-5 ImageNet labels; other outputs are written as .npy files.",
        epilog="Exit status: 0 every file answered; 1 a request failed (an error reply, or no reply within "
        "--timeout-s), one line on stderr per failed file: `jetinfer infer: FILE: error CODE: message` "
        "(CODE is the wire code, or timeout); 2 bad usage or setup (a setting, a missing, empty or "
        "non-image file, NATS unreachable), before anything is sent.",
    )
    parser.add_argument("model", metavar="MODEL", help="model name, e.g. efficientnet_lite0")
    parser.add_argument("files", metavar="FILE", nargs="+", type=Path, help="images or .npy tensors")
    add_arguments(parser, InferSettings)
    parser.set_defaults(handler=_infer_command)

    video = subparsers.add_parser(
        "video",
        help="run every sampled frame of a video (or a folder of images) through a model, in order",
        description="Publish sampled frames as one job with durable replies on RESULTS (results.<job>), "
        "collect them in frame order and write one JSON line per frame, then a summary. Re-running the same "
        "job (same input, model and sampling, or the same --job) resumes: answered frames are not sent "
        "again.",
    )
    video.add_argument("input", metavar="INPUT", type=Path, help="video file (OpenCV) or folder of .jpg/.png")
    add_arguments(video, VideoSettings, skip=frozenset({"concurrency"}))
    video.set_defaults(handler=_video_command)


def _infer_command(args: argparse.Namespace) -> int:
    settings = load_settings(InferSettings, args)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"jetinfer infer: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    for path in args.files:  # every file is looked at before the first one is sent
        check_request_file(path)
    labels = tuple(settings.labels.read_text().splitlines()) if settings.labels else None
    return asyncio.run(
        _infer(
            settings, args.model, args.files, settings.top_k, settings.input_name, labels, settings.out_dir
        )
    )


async def _infer(
    settings: InferSettings,
    model: str,
    files: list[Path],
    k: int,
    input_name: str,
    labels: tuple[str, ...] | None,
    out_dir: Path | None,
) -> int:
    failures = 0
    semaphore = asyncio.Semaphore(settings.concurrency)
    async with Client(settings=settings) as client:

        async def one(path: Path) -> tuple[Path, Any]:
            async with semaphore:
                try:
                    return path, await client.infer(
                        model, path, timeout=settings.timeout_s, input_name=input_name
                    )
                except (RequestError, RequestTimeoutError) as exc:
                    return path, exc

        for path, result in await asyncio.gather(*(one(f) for f in files)):
            if isinstance(result, Exception):
                failures += 1
                code = result.code if isinstance(result, RequestError) else "timeout"
                print(f"jetinfer infer: {path}: error {code}: {result}", file=sys.stderr)
                continue
            output = result.outputs[0].to_numpy()
            print(
                f"{path}: model {result.model_name} v{result.model_version}, "
                f"{result.timing.get('total_ms', 0):.1f} ms"
            )
            if out_dir is None and output.ndim == 2 and output.shape[1] in (1000, 1001):
                names = labels or imagenet_labels()
                for frame in output:
                    for p in top_k(frame, names, k):
                        print(f"  {p.score:6.3f}  {p.index:4d}  {p.label}")
            else:
                target = out_dir or path.parent
                target.mkdir(parents=True, exist_ok=True)
                for tensor in result.outputs:
                    destination = target / f"{path.stem}.{tensor.name}.npy"
                    np.save(destination, tensor.to_numpy(), allow_pickle=False)
                    print(f"  wrote {destination} {tensor.datatype}{list(tensor.shape)}")
    return 1 if failures else 0


def _video_command(args: argparse.Namespace) -> int:
    from .video import default_job_id

    settings = load_settings(VideoSettings, args)
    if not args.input.exists():
        print(f"jetinfer video: error: no such file or folder: {args.input}", file=sys.stderr)
        return 2
    assert settings.model is not None
    job = settings.job or default_job_id(args.input, settings.model, settings.every_n, settings.fps)
    labels = tuple(settings.labels.read_text().splitlines()) if settings.labels else imagenet_labels()
    return asyncio.run(_video(settings, args.input, job, labels))


async def _video(settings: VideoSettings, source: Path, job: str, labels: tuple[str, ...]) -> int:
    import time

    from tqdm import tqdm

    from .video import read_frames, result_line, video_job

    frames = list(read_frames(source, every_n=settings.every_n, fps=settings.fps))
    started = time.perf_counter()
    errors = resumed = 0
    progress = tqdm(
        total=len(frames),
        desc=f"job {job}",
        unit="frame",
        file=sys.stderr,
        disable=None if settings.progress else True,
    )
    assert settings.model is not None
    assert settings.out is not None
    out = settings.out
    tmp = out.with_name(f".{out.name}.tmp")
    lines: list[str] = []
    async with Client(settings=settings) as client:
        async for result in video_job(
            client,
            settings.model,
            frames,
            job=job,
            in_flight=settings.in_flight,
            stall_timeout_s=settings.timeout_s,
        ):
            lines.append(result_line(result, labels, settings.top_k) + "\n")
            errors += result.error is not None
            resumed += result.resumed
            progress.update()
    progress.close()
    await asyncio.to_thread(tmp.write_text, "".join(lines), encoding="utf-8")
    tmp.replace(out)
    elapsed = time.perf_counter() - started
    sent = len(frames) - resumed
    print(
        f"job {job}: {len(frames)} frames ({resumed} answered in an earlier run, {sent} sent now), "
        f"{errors} errors, {sent / elapsed if elapsed else 0:.1f} frames/s, {elapsed:.1f} s -> {out}"
    )
    return 1 if errors else 0
