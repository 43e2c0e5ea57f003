"""The served version of a model, and swapping it for a newer one between batches.

A new version is loaded in a background thread, warmed up with a batch, and its outputs are
checked against the config (names, shapes, datatypes, finite values) before it is swapped in.
Batches in flight finish on the old version, which is closed (its memory released) when its last
batch returns. A version whose checksum, manifest, load or warm-up fails is refused: the serving
version stays, the failure is logged, counted (``jetinfer_reloads_total{status="refused"}``) and
reported. A refused version is remembered with the state of its files and looked at again only
when they change (a copy that was interrupted and then completed loads). Versions only move forward.

Which versions may serve is the model's ``version_policy``: ``{"latest": N}`` allows the N newest
version folders, ``{"specific": [...]}`` the listed ones. The newest valid version among those
serves: a worker that starts while the newest version is broken falls back to the next allowed one;
if every allowed version is broken it says so (log, reload answer, ``/readyz``) and serves nothing
until a valid version arrives. The default ``{"latest": 1}`` allows no fall-back at start: give
``{"latest": 2}`` or more to let a starting worker serve an older version past a broken newest one.
(A running worker never gives up the version it serves for a broken newer one, whatever the policy.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jetinfer.errors import JetinferError, ModelLoadError
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelConfig, ModelRepository, ModelVersion

from .backends.base import Backend, BackendFactory, BackendOptions, load_backend
from .metrics import WorkerMetrics

__all__ = ["LoadedModel", "ModelSlot", "ReloadResult", "check_outputs"]

logger = logging.getLogger(__name__)

#: The state of a version folder's files: (name, size, mtime_ns) of each, plus the model's config.json.
Fingerprint = tuple[tuple[str, int, int], ...]


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
    """Run one batch of zeros and check every configured output: present, shape, datatype, finite."""
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
        if array.dtype != DATATYPES[spec.datatype]:
            raise ModelLoadError(f"warm-up: output {spec.name} is {array.dtype}, config says {spec.datatype}")
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise ModelLoadError(f"warm-up: output {spec.name} is not finite")


def _policy_text(config: ModelConfig) -> str:
    return f"version_policy {json.dumps(dict(config.version_policy))}"


class ModelSlot:
    """Holds the serving version of one model; thread-safe reference counting for swaps.

    `acquire`/`release` bracket every batch; `refresh` (one at a time, in a thread) loads a newer
    version and swaps it in; `close` at shutdown. `describe` is what `/readyz` shows.
    """

    def __init__(
        self,
        model: str,
        repository: Path,
        *,
        metrics: WorkerMetrics,
        options: BackendOptions | None = None,
        backend_factory: BackendFactory = load_backend,
    ) -> None:
        self.repository = ModelRepository(repository)
        self.repository.model_dir(model)  # refuses names that are not plain model names
        self.model = model
        self.metrics = metrics
        self.options = options if options is not None else BackendOptions()
        self._backend_factory = backend_factory
        self.current: LoadedModel | None = None
        self.problem = "no version loaded yet"
        self._lock = threading.Lock()
        self._reload_lock = asyncio.Lock()
        self._refused: dict[int, tuple[Fingerprint, str]] = {}
        self._draining: list[LoadedModel] = []
        self._announced = ""

    @property
    def ready(self) -> bool:
        """Whether a version is loaded."""
        return self.current is not None

    def max_batch(self, setting: int) -> int:
        """Frames per batch: `setting` (0: the config's), capped by the serving version's config (1 before
        there is one)."""
        config_max = self.current.config.max_batch if self.current else 1
        return min(setting or config_max, config_max)

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
            if close and loaded in self._draining:
                self._draining.remove(loaded)
        if close:
            self._close(loaded)

    def _close(self, loaded: LoadedModel) -> None:
        try:
            loaded.backend.close()
            logger.info("model %s: closed version %d", self.model, loaded.number)
        except Exception:
            logger.exception("model %s: closing version %d failed", self.model, loaded.number)

    def _fingerprint(self, version: int) -> Fingerprint:
        """The state of a version's files: a refused version is looked at again when it changes."""
        folder = self.repository.model_dir(self.model)
        entries = []
        try:
            for path in sorted((folder / str(version)).iterdir()):
                stat = path.stat()
                entries.append((path.name, stat.st_size, stat.st_mtime_ns))
            stat = (folder / "config.json").stat()
            entries.append(("../config.json", stat.st_size, stat.st_mtime_ns))
        except OSError:
            pass  # changing under us: the load that follows says what is wrong
        return tuple(entries)

    def _load(self, version: int) -> LoadedModel:
        loaded_version = self.repository.load_version(self.model, version)
        backend = self._backend_factory(loaded_version, self.options)
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

    def _say(self, level: int, message: str, *args: object) -> None:
        """Log a state of the slot once (polling repeats the same answer every few seconds)."""
        text = message % args
        if text != self._announced:
            self._announced = text
            logger.log(level, "%s", text)

    def _refresh_blocking(self) -> ReloadResult:
        current = self.current
        current_number = current.number if current else 0
        if current is None and not self.repository.model_dir(self.model).exists():
            self.problem = "no version in the repository yet"
            self._say(logging.WARNING, "model %s: %s; waiting for one", self.model, self.problem)
            return ReloadResult("unchanged", 0, self.problem)
        try:
            config = self.repository.config(self.model)
            on_disk = self.repository.versions(self.model)
        except JetinferError as exc:
            reason = str(exc)
            if current is None:
                self.problem = f"cannot read the repository: {reason}"
            self._say(logging.WARNING, "model %s: cannot read the repository: %s", self.model, reason)
            return ReloadResult("refused", current_number, reason)
        candidates = config.allowed_versions(on_disk)
        with self._lock:
            for gone in set(self._refused) - set(on_disk):
                del self._refused[gone]
        refused: dict[int, str] = {}
        for number in candidates:
            if number <= current_number:
                break
            fingerprint = self._fingerprint(number)
            remembered = self._refused.get(number)
            if remembered is not None and remembered[0] == fingerprint:
                refused[number] = remembered[1]
                continue
            try:
                loaded = self._load(number)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self._refused[number] = (fingerprint, reason)
                refused[number] = reason
                self.metrics.reloads.labels(model=self.model, version=str(number), status="refused").inc()
                logger.error(
                    "model %s: refused version %d: %s (%s)",
                    self.model,
                    number,
                    reason,
                    f"serving version {current_number} stays" if current else "nothing served yet",
                )
                continue
            self._swap(loaded)
            self.problem = ""
            self.metrics.reloads.labels(model=self.model, version=str(number), status="loaded").inc()
            message = f"now serving version {number}"
            if refused:
                message += " (refused newer: " + "; ".join(f"v{v}: {r}" for v, r in refused.items()) + ")"
                self._say(logging.WARNING, "model %s: %s", self.model, message)
            return ReloadResult("loaded", number, message, refused)
        if refused:
            listed = "; ".join(f"v{v}: {r}" for v, r in refused.items())
            if current is not None:
                return ReloadResult(
                    "refused", current_number, f"{listed}; version {current_number} keeps serving", refused
                )
            self.problem = (
                f"no valid version among {sorted(candidates, reverse=True)} (allowed by "
                f"{_policy_text(config)}): {listed}; nothing is served until a valid version arrives"
            )
            older = [v for v in on_disk if v not in candidates]
            if older and "latest" in config.version_policy:
                self.problem += (
                    f" (older versions {older} are outside the policy: publish a fixed file, or an old one, "
                    'as a newer version, or raise "latest" to fall back further)'
                )
            self._say(logging.ERROR, "model %s: %s", self.model, self.problem)
            return ReloadResult("refused", 0, self.problem, refused)
        if current is None:
            if not on_disk:
                self.problem = "no version in the repository yet"
            else:
                self.problem = f"no version on disk ({on_disk}) is allowed by {_policy_text(config)}"
            self._say(logging.WARNING, "model %s: %s; waiting for one", self.model, self.problem)
            return ReloadResult("unchanged", 0, self.problem)
        return ReloadResult("unchanged", current_number, "no newer valid version")

    def _swap(self, loaded: LoadedModel) -> None:
        with self._lock:
            old, self.current = self.current, loaded
            close_now = old is not None and old.refs == 0
            if old is not None:
                old.retired = True
                if not close_now:
                    self._draining.append(old)
        self._announced = ""
        logger.info("model %s: serving version %d (%s)", self.model, loaded.number, loaded.version.backend)
        if close_now and old is not None:
            self._close(old)

    def describe(self) -> dict[str, Any]:
        """What /readyz shows for this model: the serving version, versions still finishing batches,
        newer versions refused (with the reason), or why nothing is served."""
        with self._lock:
            current = self.current
            draining = sorted(d.number for d in self._draining)
            refused = {
                str(v): reason
                for v, (_, reason) in sorted(self._refused.items())
                if current is None or v > current.number
            }
        out: dict[str, Any] = {"loaded": current is not None}
        if current is not None:
            out.update(version=current.number, backend=current.version.backend)
        else:
            out["problem"] = self.problem
        if draining:
            out["draining"] = draining
        if refused:
            out["refused"] = refused
        return out

    def close(self) -> None:
        """Close the serving version (versions still in use close when their batch returns). Safe twice."""
        with self._lock:
            old, self.current = self.current, None
            close_now = old is not None and old.refs == 0
            if old is not None:
                old.retired = True
                if not close_now:
                    self._draining.append(old)
        if close_now and old is not None:
            self._close(old)
