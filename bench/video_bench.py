"""A 1,000-frame video through `jetinfer video`, against engine-only in the same run, then killed and resumed.

    python bench/video_bench.py --repository DIR [--frames 1000] [--out OUTDIR]

Writes an MJPG clip of the cat photo panning, starts an embedded nats-server and a worker, runs the
job once to the end (throughput, order, exactly one line per frame), then runs it again under a new
job id, kills the producer (SIGKILL) half way and re-runs the same job: the worker's request count
must end at exactly the number of frames. Prints a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jetinfer.bench.load import _engine_only, embedded_stack, scrape_worker_metrics

MODEL = "efficientnet_lite0"
#: A worker deployed for batch jobs: throughput before a lone request's latency (two batches at once).
WORKER_ARGS = ["--parallel-batches=2"]


__all__ = ["main", "make_clip", "served", "video_command", "wait_for_answers"]


def make_clip(path: Path, frames: int) -> None:
    """An MJPG video, 224×224, of scikit-image's cat photo panning."""
    import cv2
    import skimage.data
    from PIL import Image

    photo: Any = skimage.data.chelsea()  # type: ignore[no-untyped-call]
    cat = np.asarray(Image.fromarray(photo).resize((480, 320)))[:, :, ::-1]
    fourcc: Any = cv2.VideoWriter_fourcc  # type: ignore[attr-defined]
    writer = cv2.VideoWriter(str(path), fourcc(*"MJPG"), 25.0, (224, 224))
    for index in range(frames):
        x = (index * 3) % (480 - 224)
        writer.write(np.ascontiguousarray(cat[48 : 48 + 224, x : x + 224]))
    writer.release()


def video_command(url: str, clip: Path, out: Path, job: str) -> list[str]:
    """The `jetinfer video` command line a user would type."""
    return [
        sys.executable,
        "-m",
        "jetinfer.cli",
        "--log-level",
        "WARNING",
        "video",
        str(clip),
        "--model",
        MODEL,
        "--out",
        str(out),
        "--nats-url",
        url,
        "--job",
        job,
        "--no-progress",
        "--in-flight",
        "96",
    ]


def served(metrics_urls: list[str]) -> int:
    """Frames the workers ran so far (a message carries several: count frames, not requests)."""
    return int(sum(scrape_worker_metrics(u)["frames"] for u in metrics_urls))


def wait_for_answers(metrics_urls: list[str], count: int, process: subprocess.Popen[str]) -> None:
    """Block until the workers have run `count` frames (or the process ended)."""
    while served(metrics_urls) < count and process.poll() is None:
        time.sleep(0.05)


async def main() -> None:
    """Run the three measurements and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/jetinfer-video-bench"))
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=None,
        help=f"a flag for the worker, repeatable (default: {' '.join(WORKER_ARGS)})",
    )
    parser.add_argument(
        "--engine-batch",
        type=int,
        action="append",
        default=None,
        help="engine-only batch sizes to time; the ratio divides by the best (default: 1, 4, 32)",
    )
    args = parser.parse_args()
    worker_args = args.worker_arg or WORKER_ARGS
    engine_batches = args.engine_batch or [1, 4, 32]
    args.out.mkdir(parents=True, exist_ok=True)
    clip = args.out / "clip.avi"
    make_clip(clip, args.frames)
    engine = await asyncio.to_thread(_engine_only, args.repository, MODEL, engine_batches, 5.0)
    best = max(engine, key=lambda row: row["frames_per_s"])  # the best engine configuration
    engine_fps = best["frames_per_s"]
    engine_config = f"batch {best['batch']}, {best.get('batches_at_once', 1)} at once"
    rows: list[str] = []
    async with embedded_stack(args.repository, MODEL, bare=False, worker_args=worker_args) as (
        url,
        metrics_urls,
    ):
        out = args.out / "full.jsonl"
        started = time.perf_counter()
        full = await asyncio.to_thread(
            subprocess.run,
            video_command(url, clip, out, "bench-full"),
            capture_output=True,
            text=True,
            check=False,
        )
        elapsed = time.perf_counter() - started
        lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        in_order = [line["index"] for line in lines] == list(range(args.frames))
        rows.append(
            f"full run: exit {full.returncode}, {len(lines)} lines, in order: {in_order}, "
            f"{args.frames / elapsed:.1f} frames/s (wall clock incl. reading the clip and start-up)"
        )
        last = full.stdout.strip().splitlines()[-1] if full.stdout.strip() else ""
        match = re.search(r"([0-9.]+) frames/s", last)
        producer_fps = float(match.group(1)) if match else 0.0
        rows.append(f"producer's own line: {last or full.stderr[-300:]}")
        rows.append(
            f"engine-only best ({engine_config} of {engine_batches}): {engine_fps:.1f} frames/s; worker "
            f"{' '.join(worker_args)}; job (producer's timing, after reading "
            f"the clip): {producer_fps:.1f} frames/s; ratio {producer_fps / engine_fps:.3f}"
        )

        before = served(metrics_urls)
        out2 = args.out / "resumed.jsonl"
        process = await asyncio.to_thread(
            subprocess.Popen,
            video_command(url, clip, out2, "bench-resume"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        await asyncio.to_thread(wait_for_answers, metrics_urls, before + args.frames // 2, process)
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.communicate)
        killed_at = served(metrics_urls) - before
        rerun = await asyncio.to_thread(
            subprocess.run,
            video_command(url, clip, out2, "bench-resume"),
            capture_output=True,
            text=True,
            check=False,
        )
        await asyncio.sleep(1.0)
        total = served(metrics_urls) - before
        lines2 = [json.loads(line) for line in out2.read_text().splitlines()] if out2.exists() else []
        rows.append(
            f"killed the producer (SIGKILL) after {killed_at} frames were answered; the re-run: "
            f"{rerun.stdout.strip().splitlines()[-1] if rerun.stdout.strip() else rerun.stderr[-300:]}"
        )
        rows.append(
            f"resumed job: {len(lines2)} lines, in order: "
            f"{[line['index'] for line in lines2] == list(range(args.frames))}, inferences for the job: "
            f"{total} (frames: {args.frames}; sent twice: {total - args.frames})"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
