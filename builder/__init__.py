"""The builder: demo model export, repository versions for each backend, the repository listing and
the sidecar that publishes new versions to running workers.

Commands (registered by `builder.cli`): ``jetinfer export-demo``, ``jetinfer build``,
``jetinfer models`` and ``jetinfer sidecar``. torch is imported lazily, only where a model is
exported, and the sidecar (which needs nats-py) only when one of its names is used, so exporting
and building also work on a GPU machine that has torch but no NATS client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .build import BuildOptions, BuildResult, build, load_config_file
from .demo_models import MissingDependencyError, imagenet_labels
from .export import ExportResult, export_demo
from .models import RepositoryReport, format_report, inspect_repository

if TYPE_CHECKING:
    from .sidecar import Sidecar, SidecarSettings, WorkerAnswer, run_sidecar

__all__ = [
    "BuildOptions",
    "BuildResult",
    "ExportResult",
    "MissingDependencyError",
    "RepositoryReport",
    "Sidecar",
    "SidecarSettings",
    "WorkerAnswer",
    "build",
    "export_demo",
    "format_report",
    "imagenet_labels",
    "inspect_repository",
    "load_config_file",
    "run_sidecar",
]

_SIDECAR_NAMES = frozenset({"Sidecar", "SidecarSettings", "WorkerAnswer", "run_sidecar"})


def __getattr__(name: str) -> Any:
    if name in _SIDECAR_NAMES:
        return getattr(importlib.import_module(".sidecar", __package__), name)
    raise AttributeError(f"module 'builder' has no attribute {name!r}")
