"""The builder's subcommands: ``jetinfer export-demo``, ``build``, ``models`` and ``sidecar``.

::

    jetinfer export-demo --repository DIR [--models efficientnet_lite0,resnet50,identity] [--force]
    jetinfer build SOURCE --repository DIR [--name NAME] [--config config.json]
                   [--backend onnxruntime|tensorrt|torch] [--keep K] [--version N] [--fp16]
                   [--int8 --calibration-dir DIR] [--min-batch N] [--opt-batch N] [--max-batch N]
                   [--workspace-mb MB] [--timing-cache FILE]
    jetinfer models --repository DIR [--json] [--no-verify]
    jetinfer sidecar --source DIR --repository DIR --nats-url URL [--poll-s 2] [--once] [...]

``--repository`` also reads ``JETINFER_REPOSITORY``; every sidecar flag is also a ``JETINFER_*``
variable. Errors print one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from jetinfer.errors import JetinferError
from jetinfer.settings import add_arguments, load_settings

from .build import BACKENDS, BuildOptions, build, load_config_file
from .demo_models import DEMO_MODELS, MissingDependencyError
from .models import format_bytes, format_report, inspect_repository

__all__ = ["register"]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and shows meaningful defaults (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _fail(command: str, message: object) -> int:
    print(f"jetinfer {command}: error: {message}", file=sys.stderr)
    return 2


def _add_repository(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("JETINFER_REPOSITORY")
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path(default) if default else None,
        required=not default,
        metavar="DIR",
        help="model repository folder (env JETINFER_REPOSITORY)",
    )


# -- export-demo --------------------------------------------------------------------------------------


def _export_demo(args: argparse.Namespace) -> int:
    from .export import DEFAULT_DEMO_MODELS, export_demo, summarize

    names = [n.strip() for n in (args.models or ",".join(DEFAULT_DEMO_MODELS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in DEMO_MODELS]
    if unknown:
        return _fail("export-demo", f"unknown demo model(s) {unknown}; choose from {', '.join(DEMO_MODELS)}")
    try:
        results = export_demo(args.repository, names, force=args.force, progress=not args.no_progress)
    except MissingDependencyError as exc:
        return _fail("export-demo", exc)
    counts = summarize(results)
    print(
        f"export-demo: {args.repository}: {counts['written']} written, {counts['skipped']} up to date, "
        f"{counts['unavailable']} unavailable here"
    )
    explicitly_missing = args.models is not None and counts["unavailable"] > 0
    return 1 if explicitly_missing else 0


def _register_export_demo(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-demo",
        help="export the demo models into a model repository",
        formatter_class=_HelpFormatter,
        description=(
            "Export the demo models to ONNX and write each as a new version of a model repository:\n"
            + "\n".join(f"  {name:<20} {demo.description}" for name, demo in DEMO_MODELS.items())
            + "\nEach export is checked with onnxruntime against torch before it is published. A model\n"
            "whose newest version is valid already is skipped. Needs torch (the export extra);\n"
            "resnet50 needs torchvision too and is skipped with a note where it does not import."
        ),
    )
    _add_repository(parser)
    parser.add_argument(
        "--models",
        default=None,
        metavar="LIST",
        help=f"comma-separated demo models to export (default: {','.join(DEMO_MODELS)})",
    )
    parser.add_argument("--force", action="store_true", help="export again even if a valid version exists")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is off when not a TTY)"
    )
    parser.set_defaults(handler=_export_demo)


# -- build --------------------------------------------------------------------------------------------


def _build(args: argparse.Namespace) -> int:
    source = str(args.source)
    name = args.name or (source if source in DEMO_MODELS and not Path(source).exists() else None)
    if name is None:
        return _fail("build", "give --name (the model's name in the repository)")
    try:
        options = BuildOptions(
            backend=args.backend,
            keep=args.keep,
            fp16=args.fp16,
            int8=args.int8,
            calibration_dir=args.calibration_dir,
            min_batch=args.min_batch,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            workspace_mb=args.workspace_mb,
            timing_cache=args.timing_cache,
            version=args.version,
        )
        config = load_config_file(args.config, name) if args.config else None
        result = build(source, args.repository, name, config=config, options=options)
    except MissingDependencyError as exc:
        return _fail("build", exc)
    except JetinferError as exc:
        return _fail("build", exc)
    version = result.version
    line = (
        f"built {version.config.name} v{version.version}: {version.manifest.backend} "
        f"{version.manifest.precision}, {format_bytes(result.size_bytes)} -> {version.path}"
    )
    if result.removed:
        line += f" (removed old versions {', '.join(f'v{v}' for v in result.removed)})"
    print(line)
    return 0


def _register_build(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build",
        help="turn an ONNX file into a new repository version for a backend",
        formatter_class=_HelpFormatter,
        description=(
            "Turn SOURCE (an ONNX file, or a demo model name) into a new version of a model repository.\n"
            "  onnxruntime  check that onnxruntime loads it, that its inputs/outputs match the config,\n"
            "               and that a batch runs; then copy it as model.onnx\n"
            "  tensorrt     build a TensorRT engine (model.plan) with an optimization profile for the\n"
            "               batch sizes; needs tensorrt and a GPU (the GPU image)\n"
            "  torch        export a demo model with torch.export (model.pt2); SOURCE must be a demo name\n"
            "The version is written into a hidden folder, fsynced and renamed into place, so a failed\n"
            "build leaves nothing behind. Without --config the config is derived from the graph."
        ),
    )
    parser.add_argument(
        "source", metavar="SOURCE", help=f"ONNX file, or a demo model: {', '.join(DEMO_MODELS)}"
    )
    _add_repository(parser)
    parser.add_argument(
        "--name", default=None, help="model name in the repository, [a-z0-9_-]{1,64} (default: the demo name)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="config.json to use (inputs, outputs, max_batch, preprocess, labels); default: derived from the "
        "graph's inputs and outputs, with no preprocessing",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="onnxruntime", help="backend the version is for"
    )
    parser.add_argument(
        "--keep", type=int, default=None, metavar="K", help="afterwards keep only the newest K versions"
    )
    parser.add_argument(
        "--version", type=int, default=None, metavar="N", help="version number (default: newest + 1)"
    )
    parser.add_argument("--fp16", action="store_true", help="fp16 precision (tensorrt, torch)")
    parser.add_argument("--int8", action="store_true", help="int8 precision with calibration (tensorrt)")
    parser.add_argument(
        "--calibration-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="representative inputs for --int8 calibration (images or .npy batches)",
    )
    parser.add_argument("--min-batch", type=int, default=1, metavar="N", help="smallest batch of the profile")
    parser.add_argument(
        "--opt-batch",
        type=int,
        default=None,
        metavar="N",
        help="batch the engine is tuned for (default: max)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="largest batch; overrides the config's max_batch (default: the config's, or 32 when derived)",
    )
    parser.add_argument(
        "--workspace-mb", type=int, default=4096, metavar="MB", help="TensorRT builder workspace"
    )
    parser.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        metavar="FILE",
        help="TensorRT timing cache to read and update (faster rebuilds on the same GPU)",
    )
    parser.set_defaults(handler=_build)


# -- models -------------------------------------------------------------------------------------------


def _models(args: argparse.Namespace) -> int:
    report = inspect_repository(args.repository, verify_checksums=not args.no_verify)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_report(report))
    if report.problem is not None:
        return 2
    return 0 if report.ok else 1


def _register_models(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list a repository's models and versions, and what is wrong with them",
        formatter_class=_HelpFormatter,
        description=(
            "List the models of a repository: versions, backends, precision, sizes, the version that\n"
            "would serve, and what is wrong with any invalid one (checksum mismatch, bad or missing\n"
            "manifest, backend mismatch, missing file). Folders a worker ignores (invalid model names,\n"
            "non-numeric versions, leftovers of interrupted writes) are listed too.\n"
            "Exit status: 0 all valid, 1 something is wrong, 2 no such repository."
        ),
    )
    _add_repository(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the sha256 checks (faster on big engines)"
    )
    parser.set_defaults(handler=_models)


# -- sidecar ------------------------------------------------------------------------------------------


def _sidecar(args: argparse.Namespace) -> int:
    from .sidecar import SidecarSettings, run_sidecar

    settings = load_settings(SidecarSettings, args)
    return asyncio.run(run_sidecar(settings))


def _register_sidecar(subparsers: Any) -> None:
    from .sidecar import SidecarSettings

    parser = subparsers.add_parser(
        "sidecar",
        help="publish new versions from a source folder into the repository and signal the workers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Watch SOURCE (SOURCE/<model>/config.json, SOURCE/<model>/<version>/model.* + manifest.json).\n"
            "A new version is taken once its files did not change between two scans and its checksum\n"
            "matches its manifest (a half-copied upload waits; a broken one is refused with a reason).\n"
            "It is copied atomically into the repository under the same number, then the reload signal\n"
            "goes to jetinfer.control.reload.<model>, and each worker's answer is printed.\n"
            "Runs until SIGTERM; with --once it scans twice, --poll-s apart, and exits (1 if refused)."
        ),
    )
    add_arguments(parser, SidecarSettings)
    parser.set_defaults(handler=_sidecar)


def register(subparsers: Any) -> None:
    """Add ``export-demo``, ``build``, ``models`` and ``sidecar`` to the ``jetinfer`` command."""
    _register_export_demo(subparsers)
    _register_build(subparsers)
    _register_models(subparsers)
    _register_sidecar(subparsers)
