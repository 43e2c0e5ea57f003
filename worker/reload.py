"""The served version of a model, and swapping it for a newer one between batches.

A new version is loaded in a background thread, warmed up with a batch, and its outputs are
checked against the config before it is swapped in. Batches in flight finish on the old version,
which is closed (its memory released) when its last batch returns. A version whose checksum,
manifest, load or warm-up fails is refused: the serving version stays, the failure is logged,
counted and reported. Versions only move forward.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jetinfer.errors import JetinferError, ModelLoadError
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelConfig, ModelRepository, ModelVersion
from worker.backends.base import Backend, load_backend
from worker.metrics import WorkerMetrics

__all__ = ["LoadedModel", "ModelSlot", "ReloadResult"]

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A loaded version and how many batches are using it."""

    backend: Backend
    version: ModelVersion
    refs: int = 0
    retired: bool = False

    @property
    def config(self) -> ModelConfig:
        """The model config this version was loaded with."""
        return self.version.config

    @property
    def number(self) -> int:
        """The version number."""
        return self.version.version


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: loaded a newer version, refused one, or found nothing newer."""

    status: Literal["loaded", "refused", "unchanged"]
    version: int
    message: str = ""
    refused: dict[int, str] = field(default_factory=dict)


def check_outputs(backend: Backend, config: ModelConfig) -> None:
    """Run one batch of zeros and check every configured output comes back with the right shape."""
    batch = 1
    dummy = {
        spec.name: np.zeros((batch, *[d if d > 0 else 1 for d in spec.shape]), dtype=DATATYPES[spec.datatype])
        for spec in config.inputs
    }
    outputs = backend.infer(dummy)
    for spec in config.outputs:
        if spec.name not in outputs:
            raise ModelLoadError(f"warm-up: output {spec.name!r} missing; got {sorted(outputs)}")
        array = outputs[spec.name]
        if array.shape[:1] != (batch,) or not spec.accepts(array.shape[1:]):
            raise ModelLoadError(
                f"warm-up: output {spec.name} has shape {list(array.shape)}, config says "
                f"[batch, {', '.join(map(str, spec.shape))}]"
            )
        if not np.isfinite(array.astype(np.float64, copy=False)).all():
            raise ModelLoadError(f"warm-up: output {spec.name} is not finite")


class ModelSlot:
    """Holds the serving version of one model; thread-safe reference counting for swaps."""

    def __init__(
        self,
        model: str,
        repository: Path,
        *,
        metrics: WorkerMetrics,
        device: int | None = None,
    ) -> None:
        self.model = model
        self.repository = ModelRepository(repository)
        self.metrics = metrics
        self.device = device
        self.current: LoadedModel | None = None
        self._lock = threading.Lock()
        self._reload_lock = asyncio.Lock()
        self._refused: dict[tuple[int, float], str] = {}

    @property
    def ready(self) -> bool:
        """Whether a version is loaded."""
        return self.current is not None

    def acquire(self) -> LoadedModel:
        """The current version, counted as in use until `release`."""
        with self._lock:
            if self.current is None:
                raise ModelLoadError(f"model {self.model} has no loaded version")
            self.current.refs += 1
            return self.current

    def release(self, loaded: LoadedModel) -> None:
        """Stop using `loaded`; closes it if it was retired and this was its last batch."""
        with self._lock:
            loaded.refs -= 1
            close = loaded.retired and loaded.refs == 0
        if close:
            self._close(loaded)

    def _close(self, loaded: LoadedModel) -> None:
        try:
            loaded.backend.close()
            logger.info("model %s: closed version %d", self.model, loaded.number)
        except Exception:
            logger.exception("model %s: closing version %d failed", self.model, loaded.number)

    def _manifest_mtime(self, version: int) -> float:
        try:
            return (self.repository.model_dir(self.model) / str(version) / "manifest.json").stat().st_mtime
        except OSError:
            return 0.0

    def _load(self, version: int) -> LoadedModel:
        loaded_version = self.repository.load_version(self.model, version)
        backend = load_backend(loaded_version, device=self.device)
        try:
            if loaded_version.config.warmup:
                backend.warmup()
            check_outputs(backend, loaded_version.config)
        except Exception:
            backend.close()
            raise
        return LoadedModel(backend=backend, version=loaded_version)

    async def refresh(self) -> ReloadResult:
        """Load the newest allowed version newer than the current one, if any (in a thread)."""
        async with self._reload_lock:
            return await asyncio.to_thread(self._refresh_blocking)

    def _refresh_blocking(self) -> ReloadResult:
        current_number = self.current.number if self.current else 0
        try:
            candidates = self.repository.candidates(self.model)
        except JetinferError as exc:
            logger.warning("model %s: cannot read the repository: %s", self.model, exc)
            return ReloadResult("refused", current_number, str(exc))
        refused: dict[int, str] = {}
        for number in candidates:
            if number <= current_number:
                break
            key = (number, self._manifest_mtime(number))
            if key in self._refused:
                refused[number] = self._refused[key]
                continue
            try:
                loaded = self._load(number)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self._refused[key] = reason
                refused[number] = reason
                self.metrics.reloads.labels(model=self.model, version=str(number), status="refused").inc()
                logger.error(
                    "model %s: refused version %d: %s (serving version %s stays)",
                    self.model,
                    number,
                    reason,
                    current_number or "none",
                )
                continue
            self._swap(loaded)
            self.metrics.reloads.labels(model=self.model, version=str(number), status="loaded").inc()
            return ReloadResult("loaded", number, f"now serving version {number}", refused)
        if refused:
            message = "; ".join(f"v{v}: {r}" for v, r in refused.items())
            return ReloadResult("refused", current_number, message, refused)
        return ReloadResult("unchanged", current_number, "no newer valid version")

    def _swap(self, loaded: LoadedModel) -> None:
        with self._lock:
            old, self.current = self.current, loaded
            close_now = old is not None and old.refs == 0
            if old is not None:
                old.retired = True
        logger.info("model %s: serving version %d (%s)", self.model, loaded.number, loaded.version.backend)
        if close_now and old is not None:
            self._close(old)

    def describe(self) -> dict[str, Any]:
        """What /readyz shows for this model."""
        current = self.current
        if current is None:
            return {"loaded": False}
        return {"loaded": True, "version": current.number, "backend": current.version.backend}

    def close(self) -> None:
        """Close the serving version. Safe to call twice."""
        with self._lock:
            old, self.current = self.current, None
        if old is not None:
            old.retired = True
            if old.refs == 0:
                self._close(old)
