"""The demo models on this machine: where they are cached, and exporting them there once.

`jetinfer demo` and `jetinfer bench --embedded` serve the demo classifier from this cache; exporting
runs `jetinfer export-demo` in a child process (it needs the `export` extra: torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jetinfer.errors import ExportError, RepositoryError
from jetinfer.repository import ModelRepository

__all__ = ["DEMO_MODEL", "default_model_cache", "ensure_demo_model"]

#: The classifier the demo serves.
DEMO_MODEL = "efficientnet_lite0"


def default_model_cache() -> Path:
    """`$XDG_CACHE_HOME/jetinfer/models` (the platform's cache folder convention), else ~/.cache/..."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jetinfer" / "models"


def ensure_demo_model(cache_dir: Path) -> None:
    """Export the demo classifier into `cache_dir` unless a valid version is there."""
    repository = ModelRepository(cache_dir)
    state = "not exported yet"
    if (repository.model_dir(DEMO_MODEL) / "config.json").exists():
        try:
            candidates = repository.candidates(DEMO_MODEL)
            if candidates:
                repository.load_version(DEMO_MODEL, candidates[0])
                return
        except (RepositoryError, OSError) as exc:
            state = f"not usable ({exc})"
    print(
        f"{DEMO_MODEL} is {state} in {cache_dir}: exporting it (needs the 'export' extra: torch) ...",
        flush=True,
    )
    command = [
        sys.executable,
        "-m",
        "jetinfer.cli",
        "export-demo",
        "--repository",
        str(cache_dir),
        "--models",
        DEMO_MODEL,
    ]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise ExportError(
            f"exporting the demo model failed (exit {result.returncode}): {' '.join(command)}; "
            "install the export extra (pip install 'jetinfer[export]') "
            "or pass --cache-dir with an exported model"
        )
