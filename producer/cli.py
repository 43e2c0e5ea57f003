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
from producer.client import Client
from producer.settings import ProducerSettings

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
