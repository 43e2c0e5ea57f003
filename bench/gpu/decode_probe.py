"""Time the JPEG decoders a GPU worker can use, on the machine it runs on.

    python bench/gpu/decode_probe.py [--batch 128] [--seconds 3] [--processes 4 8 12]

Decodes, resizes and normalises batches of the cat photo (224x224 JPEG) with `GpuJpegDecoder`, once
with nvimgcodec off (torchvision) and once with it on; prints images/s for each and which
library served, the CPU time the calling thread spends per batch and the share of the GIL a spinning
thread still gets meanwhile (1.0: the decoder releases it; about 0.5: it holds it), and checks the two
agree on the pixels. Then the CPU: one image at a time with
Pillow in this process, and `--decode-processes`' pool (`ProcessDecoder`, shared memory, then
`GpuNormaliser.from_pixels`) at each `--processes` count.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from collections.abc import Callable

import numpy as np

from jetinfer.bench.load import _cat_jpeg
from jetinfer.images import decode_pixels
from jetinfer.repository import PreprocessConfig
from jetinfer.worker.decode_processes import ProcessDecoder
from jetinfer.worker.gpu_decode import GpuJpegDecoder, GpuNormaliser

CONFIG = PreprocessConfig(
    input="input", width=224, height=224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)
)


def main() -> None:
    """Print one line per decoder, then their agreement."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", type=int, nargs="*", default=[], help="decoding process counts")
    parser.add_argument("--skip-gpu-decoders", action="store_true", help="time the CPU decoders only")
    args = parser.parse_args()
    if not args.skip_gpu_decoders:
        gpu_decoders(args.batch, args.seconds)
    cpu_decoders(args.batch, args.seconds, args.processes)


def cpu_decoders(batch: int, seconds: float, counts: list[int]) -> None:
    """Pillow in this process, then a pool of decoding processes feeding the GPU normaliser."""
    image = _cat_jpeg(224)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode_pixels(image, CONFIG)
        done += 1
    elapsed = time.perf_counter() - started
    print(f"Pillow, one thread: {done / elapsed:,.0f} images/s ({elapsed / done * 1e3:.3f} ms per image)")
    normaliser = GpuNormaliser(CONFIG)
    images = [image] * batch
    for count in counts:
        decoder = ProcessDecoder(CONFIG, processes=count, max_frames=batch)
        pinned = normaliser.pin(decoder.buffer)
        for copy in (False, True):
            with decoder.decode(images, CONFIG) as pixels:  # warm-up
                normaliser.from_pixels(pixels)
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                with decoder.decode(images, CONFIG) as pixels:
                    if copy:
                        normaliser.from_pixels(pixels)
                done += batch
            rate = done / (time.perf_counter() - started)
            what = "then to the GPU" + (" (page-locked)" if pinned else "") if copy else "decode only"
            print(f"{count:>3} decoding processes, batch {batch}, {what}: {rate:,.0f} images/s")
        if pinned:
            normaliser.unpin(decoder.buffer)
        decoder.close()


def gpu_decoders(batch: int, seconds: float) -> None:
    """nvJPEG through torchvision, then nvImageCodec (the hardware JPEG engine where it has one): images/s
    at `batch`, the median time of a batch of one, and their agreement."""
    images = [_cat_jpeg(224)] * batch
    outputs = {}
    for flag in (False, True):
        decoder = GpuJpegDecoder(CONFIG, nvimgcodec=flag)
        decoder.decode(images)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            out = decoder.decode(images)
            done += len(images)
        rate = done / (time.perf_counter() - started)
        cpu_ms, gil_left = _calling_thread_costs(functools.partial(decoder.decode, images), seconds)
        outputs[decoder.library] = out.cpu().numpy()
        lone = []
        for _ in range(200):
            started = time.perf_counter()
            decoder.decode(images[:1])
            lone.append(time.perf_counter() - started)
        print(
            f"--nvimgcodec={flag}: {decoder.library}: {rate:,.0f} images/s at batch {batch}; "
            f"batch 1 p50 {sorted(lone)[len(lone) // 2] * 1e3:.3f} ms; calling thread {cpu_ms:.2f} ms CPU "
            f"per batch, GIL left to a spinning thread {gil_left:.2f}"
        )
    if len(outputs) == 2:
        first, second = outputs.values()
        print(
            f"mean |difference| of the two decoders: {np.abs(first - second).mean():.4f} (normalised units)"
        )


def _spin_rate(stop: threading.Event, counts: list[int]) -> None:
    n = 0
    while not stop.is_set():
        n += 1
    counts.append(n)


def _calling_thread_costs(call: Callable[[], object], seconds: float) -> tuple[float, float]:
    """(CPU ms of the calling thread per call, the spinning thread's count rate while calling / alone)."""
    rates = []
    for busy in (False, True):
        stop, counts = threading.Event(), list[int]()
        spinner = threading.Thread(target=_spin_rate, args=(stop, counts))
        started, cpu_started, calls = time.perf_counter(), time.thread_time(), 0
        spinner.start()
        while time.perf_counter() - started < seconds:
            if busy:
                call()
                calls += 1
            else:
                time.sleep(0.01)
        cpu = time.thread_time() - cpu_started
        stop.set()
        spinner.join()
        rates.append(counts[0] / (time.perf_counter() - started))
    return cpu / max(1, calls) * 1e3, rates[1] / max(rates[0], 1e-9)


if __name__ == "__main__":
    main()
