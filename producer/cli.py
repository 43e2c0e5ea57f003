"""The producer commands: `jetinfer infer` (images or .npy tensors through a served model, top-5 labels
or outputs) here, and `jetinfer video` (`producer.video_cli`)."""

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

from .cli_settings import InferSettings
from .client import Client
from .files import check_request_file
from .video_cli import register_video

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

    register_video(subparsers)


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
