"""The builder's subcommands: ``jetinfer export-demo``, ``build``, ``models`` and ``sidecar``.

::

    jetinfer export-demo --repository DIR [--models efficientnet_lite0,resnet50,identity] [--force]
    jetinfer build SOURCE --repository DIR [--name NAME] [--config config.json] [--serving-repository DIR]
                   [--backend onnxruntime|tensorrt|torch] [--keep K] [--version N] [--fp16]
                   [--int8 --calibration-dir DIR] [--min-batch N] [--opt-batch N] [--max-batch N]
                   [--workspace-mb MB] [--timing-cache FILE]
    jetinfer models --repository DIR [--json] [--no-verify]
    jetinfer sidecar --source DIR --repository DIR --nats-url URL [--poll-s 2] [--once] [...]

Every flag is also a ``JETINFER_*`` variable (``--repository`` is ``JETINFER_REPOSITORY``; the settings
are in ``builder.cli_settings`` and ``builder.sidecar``). Errors print one line naming the problem,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from jetinfer.errors import JetinferError
from jetinfer.settings import add_arguments, load_settings

from .build import BuildOptions, build, load_config_file
from .cli_settings import BuildSettings, ExportDemoSettings, ModelsSettings
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


# -- export-demo --------------------------------------------------------------------------------------


def _export_demo(args: argparse.Namespace) -> int:
    from .export import DEFAULT_DEMO_MODELS, export_demo, summarize

    settings = load_settings(ExportDemoSettings, args)
    assert settings.repository is not None
    names = settings.models or list(DEFAULT_DEMO_MODELS)
    unknown = [n for n in names if n not in DEMO_MODELS]
    if unknown:
        return _fail("export-demo", f"unknown demo model(s) {unknown}; choose from {', '.join(DEMO_MODELS)}")
    try:
        results = export_demo(settings.repository, names, force=settings.force, progress=settings.progress)
    except MissingDependencyError as exc:
        return _fail("export-demo", exc)
    counts = summarize(results)
    print(
        f"export-demo: {settings.repository}: {counts['written']} written, {counts['skipped']} up to date, "
        f"{counts['unavailable']} unavailable here"
    )
    explicitly_missing = bool(settings.models) and counts["unavailable"] > 0
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
    add_arguments(parser, ExportDemoSettings)
    parser.set_defaults(handler=_export_demo)


# -- build --------------------------------------------------------------------------------------------


def _build(args: argparse.Namespace) -> int:
    settings = load_settings(BuildSettings, args)
    assert settings.repository is not None
    source = str(args.source)
    name = settings.name or (source if source in DEMO_MODELS and not Path(source).exists() else None)
    if name is None:
        return _fail("build", "give --name (the model's name in the repository)")
    backend = settings.backend or ("torch" if source.endswith(".pt2") else "onnxruntime")
    try:
        options = BuildOptions(
            backend=backend,
            keep=settings.keep,
            fp16=settings.fp16,
            int8=settings.int8,
            calibration_dir=settings.calibration_dir,
            min_batch=settings.min_batch,
            opt_batch=settings.opt_batch,
            max_batch=settings.max_batch,
            workspace_mb=settings.workspace_mb,
            timing_cache=settings.timing_cache,
            version=settings.version,
            serving_repository=settings.serving_repository,
        )
        config = load_config_file(settings.config, name) if settings.config else None
        result = build(source, settings.repository, name, config=config, options=options)
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
        help="turn an ONNX file (or a torch.export program) into a new repository version for a backend",
        formatter_class=_HelpFormatter,
        description=(
            "Turn SOURCE (an ONNX file, a torch.export program .pt2, or a demo model name) into a new\n"
            "version of a model repository.\n"
            "  onnxruntime  check that onnxruntime loads it, that its inputs/outputs match the config,\n"
            "               and that a batch runs; then copy it as model.onnx\n"
            "  tensorrt     build a TensorRT engine (model.plan) with an optimization profile for the\n"
            "               batch sizes; needs tensorrt and a GPU (the GPU image)\n"
            "  torch        a .pt2 program (torch.export.save) with --config: check that it loads, that\n"
            "               its batch dimension reaches max_batch and that a batch runs, then copy it as\n"
            "               model.pt2; or export a demo model with torch.export\n"
            "The version is written into a hidden folder, fsynced and renamed into place, so a failed\n"
            "build leaves nothing behind. Without --config an ONNX file's config is derived from the graph."
        ),
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help=f"ONNX file, .pt2 program, or a demo model: {', '.join(DEMO_MODELS)}",
    )
    add_arguments(parser, BuildSettings)
    parser.set_defaults(handler=_build)


# -- models -------------------------------------------------------------------------------------------


def _models(args: argparse.Namespace) -> int:
    settings = load_settings(ModelsSettings, args)
    assert settings.repository is not None
    report = inspect_repository(settings.repository, verify_checksums=settings.verify)
    if settings.json:
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
    add_arguments(parser, ModelsSettings)
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
