"""`jetinfer infer`: classify images (top-5 labels) or run tensors (.npy) through a served model."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jetinfer.errors import RequestError
from jetinfer.labels import imagenet_labels, top_k
from jetinfer.settings import add_arguments, load_settings

from .client import Client
from .settings import ProducerSettings

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the producer subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "infer",
        help="send images or .npy tensors to a model and print the results",
        description="Send each FILE (.jpg/.jpeg/.png as an image, .npy as a tensor) to MODEL. Classifier "
        "outputs (1000 classes) print the top-5 ImageNet labels; other outputs are written as .npy files.",
    )
    parser.add_argument("model", metavar="MODEL", help="model name, e.g. efficientnet_lite0")
    parser.add_argument("files", metavar="FILE", nargs="+", type=Path, help="images or .npy tensors")
    parser.add_argument("--top-k", type=int, default=5, help="labels to print per image")
    parser.add_argument("--input-name", default="input", help="input tensor name for .npy files")
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="label file (one per line); default: ImageNet labels for 1000-class outputs",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="write every output as FILE.OUTPUT.npy here (default: only for non-classifiers, "
        "next to the input)",
    )
    add_arguments(parser, ProducerSettings)
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
    video.add_argument("--model", required=True, help="model name, e.g. efficientnet_lite0")
    video.add_argument("--out", type=Path, required=True, help="JSON-lines file to write, one line per frame")
    video.add_argument("--job", default=None, help="job id (default: derived from input, model and sampling)")
    video.add_argument("--every-n", type=int, default=1, help="keep every n-th frame")
    video.add_argument("--fps", type=float, default=None, help="keep at most this many frames per second")
    video.add_argument("--in-flight", type=int, default=64, help="frames sent and not yet answered, at most")
    video.add_argument("--top-k", type=int, default=5, help="labels per frame for classifier outputs")
    video.add_argument(
        "--labels", type=Path, default=None, help="label file (default: ImageNet for 1000 classes)"
    )
    video.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_arguments(video, ProducerSettings)
    video.set_defaults(handler=_video_command)


def _infer_command(args: argparse.Namespace) -> int:
    settings = load_settings(ProducerSettings, args)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"jetinfer infer: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    labels = tuple(args.labels.read_text().splitlines()) if args.labels else None
    return asyncio.run(
        _infer(settings, args.model, args.files, args.top_k, args.input_name, labels, args.out_dir)
    )


async def _infer(
    settings: ProducerSettings,
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
                except RequestError as exc:
                    return path, exc

        for path, result in await asyncio.gather(*(one(f) for f in files)):
            if isinstance(result, Exception):
                failures += 1
                print(f"{path}: error {getattr(result, 'code', type(result).__name__)}: {result}")
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
    from .ids import id_key
    from .video import default_job_id

    settings = load_settings(ProducerSettings, args)
    if not args.input.exists():
        print(f"jetinfer video: error: no such file or folder: {args.input}", file=sys.stderr)
        return 2
    if args.every_n < 1 or (args.fps is not None and args.fps <= 0) or args.in_flight < 1:
        print("jetinfer video: error: --every-n and --in-flight must be >= 1, --fps above 0", file=sys.stderr)
        return 2
    key = id_key(settings) if settings.tenant else b""
    job = args.job or default_job_id(args.input, args.model, args.every_n, args.fps, key=key)
    labels = tuple(args.labels.read_text().splitlines()) if args.labels else imagenet_labels()
    return asyncio.run(_video(settings, args, job, labels))


async def _video(
    settings: ProducerSettings, args: argparse.Namespace, job: str, labels: tuple[str, ...]
) -> int:
    import time

    from tqdm import tqdm

    from .video import read_frames, result_line, video_job

    frames = list(read_frames(args.input, every_n=args.every_n, fps=args.fps))
    started = time.perf_counter()
    errors = resumed = 0
    progress = tqdm(
        total=len(frames), desc=f"job {job}", unit="frame", file=sys.stderr, disable=args.no_progress
    )
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    lines: list[str] = []
    async with Client(settings=settings) as client:
        async for result in video_job(
            client,
            args.model,
            frames,
            job=job,
            in_flight=args.in_flight,
            stall_timeout_s=settings.timeout_s,
        ):
            lines.append(result_line(result, labels, args.top_k) + "\n")
            errors += result.error is not None
            resumed += result.resumed
            progress.update()
    progress.close()
    await asyncio.to_thread(tmp.write_text, "".join(lines), encoding="utf-8")
    tmp.replace(args.out)
    elapsed = time.perf_counter() - started
    sent = len(frames) - resumed
    print(
        f"job {job}: {len(frames)} frames ({resumed} answered in an earlier run, {sent} sent now), "
        f"{errors} errors, {sent / elapsed if elapsed else 0:.1f} frames/s, {elapsed:.1f} s -> {args.out}"
    )
    return 1 if errors else 0
