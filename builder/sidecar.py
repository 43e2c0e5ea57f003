"""`jetinfer sidecar`: publish new model versions from a source folder into the shared repository.

It runs as the second container of a worker pod. A CI pipeline drops built versions into the source
folder, laid out like the repository::

    SOURCE/<model>/config.json (+ labels.txt)
    SOURCE/<model>/<version>/model.{onnx,plan,pt2} + manifest.json

Every `poll_s` seconds the sidecar scans the source. A version newer than everything the repository
holds is taken only when it is *complete*: its files (and the model's config) did not change since the
previous scan, its manifest is present and valid, and its model file's sha256 matches the manifest.
A half-copied upload therefore waits; a version that stays broken is refused with a logged reason
(once per state of its files: when they change, it is looked at again) and never copied. So is a
version not newer than the repository's newest whose number the repository holds as another build
(numbered from the wrong folder): it could never be published, and the refusal names the fix.

A complete version is copied with `write_version` (hidden temporary folder, fsync, rename; same version
number, checksum verified on the copy), then the reload signal is published on core NATS subject
``jetinfer.control.reload.<model>`` with body ``{"model": m, "version": v}`` and a reply inbox; every
worker that serves the model answers ``{"worker", "model", "status": "loaded"|"refused"|"unchanged",
"version", "message"}``. The sidecar collects answers for `answer_wait_s` seconds, logs and prints each.
File I/O and hashing run in threads; SIGTERM stops it between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from nats.aio.client import Client as NatsClient

from jetinfer.cleanup import logged
from jetinfer.connection import connect
from jetinfer.errors import RepositoryError
from jetinfer.protocol import MODEL_NAME_PATTERN
from jetinfer.repository import ModelRepository, ModelVersion, prune_versions, write_version
from jetinfer.settings import ConnectionSettings, require, setting
from jetinfer.streams import reload_subject

__all__ = [
    "PollResult",
    "Published",
    "Refused",
    "Sidecar",
    "SidecarSettings",
    "WorkerAnswer",
    "run_sidecar",
]

logger = logging.getLogger(__name__)

#: A version folder's state: (relative file name, size, mtime_ns) of each file, plus the model's config.
Snapshot = tuple[tuple[str, int, int], ...]

ANSWER_STATUSES: Final = frozenset({"loaded", "refused", "unchanged"})


@dataclass(kw_only=True)
class SidecarSettings(ConnectionSettings):
    """Settings of `jetinfer sidecar` (NATS connection, auth and TLS come from ConnectionSettings)."""

    source: Path | None = setting(None, "folder where built versions arrive: SOURCE/<model>/<version>/")
    repository: Path | None = setting(None, "the shared model repository the workers load from")
    poll_s: float = setting(2.0, "seconds between scans of the source folder")
    answer_wait_s: float = setting(3.0, "seconds to collect the workers' answers to a reload signal")
    keep_versions: int = setting(
        0, "keep only the newest K versions of each model in the repository (0: all)"
    )
    retries: int = setting(3, "attempts at a failing copy, signal or connection before giving up on it")
    once: bool = setting(False, "scan, wait poll-s, take what is complete, signal, and exit")
    nats_name: str = setting("jetinfer-sidecar", "client name shown in the server's connection list")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.source is not None, "source", "give the folder where new versions arrive")
        require(self.repository is not None, "repository", "give the model repository folder")
        assert self.source is not None
        assert self.repository is not None
        self.source = Path(self.source)
        self.repository = Path(self.repository)
        require(self.source.is_dir(), "source", f"{self.source} is not a folder")
        require(self.source.resolve() != self.repository.resolve(), "repository", "must differ from --source")
        require(
            self.repository.is_dir() or self.repository.parent.is_dir(),
            "repository",
            f"{self.repository} is not a folder (and its parent does not exist)",
        )
        require(self.poll_s >= 0.05, "poll_s", "must be at least 0.05 seconds")
        require(self.answer_wait_s >= 0, "answer_wait_s", "must not be negative")
        require(self.keep_versions >= 0, "keep_versions", "must be 0 (keep all) or more")
        require(self.retries >= 1, "retries", "must be at least 1")


@dataclass(frozen=True)
class WorkerAnswer:
    """One worker's answer to a reload signal."""

    worker: str
    model: str
    status: str
    version: int | None
    message: str

    @classmethod
    def parse(cls, data: bytes) -> WorkerAnswer:
        """Parse an answer; raises ValueError for anything that is not the agreed JSON."""
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("answer is not a JSON object")
        status = str(obj.get("status", ""))
        if status not in ANSWER_STATUSES:
            raise ValueError(f"status {status!r} is not one of {sorted(ANSWER_STATUSES)}")
        version = obj.get("version")
        return cls(
            worker=str(obj.get("worker", "?")),
            model=str(obj.get("model", "?")),
            status=status,
            version=version if type(version) is int else None,
            message=str(obj.get("message", "")),
        )


@dataclass(frozen=True)
class Published:
    """A version copied into the repository by this sidecar."""

    model: str
    version: int
    path: Path


@dataclass(frozen=True)
class Refused:
    """A source version that was not copied, and why."""

    model: str
    version: int
    reason: str


@dataclass
class PollResult:
    """What one scan did."""

    published: list[Published] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    waiting: list[tuple[str, int]] = field(default_factory=list)
    answers: dict[str, list[WorkerAnswer]] = field(default_factory=dict)


def _numeric_versions(folder: Path) -> list[int]:
    """Positive integer sub-folders of `folder`, ascending (quietly: no warnings)."""
    if not folder.is_dir():
        return []
    return sorted(
        int(e.name)
        for e in folder.iterdir()
        if e.is_dir() and e.name.isdigit() and not e.name.startswith("0")
    )


def _snapshot(model_folder: Path, version_folder: Path) -> Snapshot:
    entries = []
    for base, prefix in ((version_folder, ""), (model_folder, "../")):
        for path in sorted(base.iterdir()):
            if path.is_file():
                stat = path.stat()
                entries.append((prefix + path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


@dataclass(frozen=True)
class _Candidate:
    model: str
    version: int
    snapshot: Snapshot
    #: Why it cannot be published whatever its files (a number the repository holds another build of).
    shadowed: str | None = None


class Sidecar:
    """Watches the source folder, copies complete versions into the repository, signals the workers.

    Use as an async context manager (connects to NATS, drains on exit), or pass a connected client.
    `poll()` is one scan; `run()` scans until `stop()` (or SIGTERM, via `run_sidecar`).
    """

    def __init__(
        self,
        settings: SidecarSettings,
        *,
        nc: NatsClient | None = None,
        out: TextIO | None = None,
    ) -> None:
        assert settings.source is not None
        assert settings.repository is not None
        self.settings = settings
        self.source: Path = settings.source
        self.repository: Path = settings.repository
        self._nc = nc
        self._own_connection = nc is None
        self._out = out if out is not None else sys.stdout
        self._previous: dict[tuple[str, int], Snapshot] = {}
        self._refused: dict[tuple[str, int], Snapshot] = {}
        self._failures: dict[tuple[str, int], int] = {}
        self._warned: set[str] = set()
        self._stop = asyncio.Event()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Sidecar:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the repository folder and connect to NATS (bounded retries with back-off)."""
        await asyncio.to_thread(self.repository.mkdir, parents=True, exist_ok=True)
        if self._nc is not None:
            return
        delay = 0.5
        for attempt in range(1, self.settings.retries + 1):
            try:
                self._nc = await connect(self.settings, name=self.settings.nats_name)
                return
            except ConnectionError as exc:
                if attempt == self.settings.retries or self._stop.is_set():
                    raise
                logger.warning("sidecar: %s (attempt %d of %d)", exc, attempt, self.settings.retries)
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)

    def stop(self) -> None:
        """Ask `run()` to finish the step it is in and return."""
        self._stop.set()

    async def close(self) -> None:
        """Drain and close the NATS connection if this sidecar opened it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        nc, self._nc = self._nc, None
        if nc is not None and self._own_connection and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5)
            except Exception as exc:  # drain failing must not hide the reason we are closing
                logger.warning("sidecar: draining the NATS connection failed: %s", exc)
                await logged(logger, "sidecar: closing the NATS connection", nc.close())

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- scanning ----------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _scan(self) -> list[_Candidate]:
        """Versions in the source newer than the repository's newest, with their snapshots, and those
        never to be published because the repository holds another build of their number (thread)."""
        found = []
        for model_folder in sorted(self.source.iterdir()):
            name = model_folder.name
            if name.startswith(".") or not model_folder.is_dir():
                continue
            if not MODEL_NAME_PATTERN.fullmatch(name):
                self._warn_once(
                    f"name:{model_folder}", "sidecar: ignoring %s: not a valid model name", model_folder
                )
                continue
            newest = max(_numeric_versions(self.repository / name), default=0)
            for entry in sorted(model_folder.iterdir()):
                if not entry.is_dir() or entry.name.startswith("."):
                    continue
                if not entry.name.isdigit() or entry.name.startswith("0"):
                    self._warn_once(
                        f"version:{entry}",
                        "sidecar: ignoring %s: version folders are positive integers",
                        entry,
                    )
                    continue
                number = int(entry.name)
                shadowed = self._shadowed(name, number, newest) if number <= newest else None
                if number <= newest and shadowed is None:
                    continue
                try:
                    found.append(_Candidate(name, number, _snapshot(model_folder, entry), shadowed))
                except OSError as exc:  # removed while we looked
                    logger.debug("sidecar: %s changed while scanning: %s", entry, exc)
        return found

    def _shadowed(self, model: str, number: int, newest: int) -> str | None:
        """Why a source version not newer than the repository's newest is never published, when the
        repository holds another build under its number (a build numbered from the wrong folder)."""
        try:
            ours = json.loads((self.source / model / str(number) / "manifest.json").read_text())
            theirs = json.loads((self.repository / model / str(number) / "manifest.json").read_text())
        except (OSError, ValueError):  # not in the repository (pruned), or being written: nothing to say
            return None
        if (
            not isinstance(ours, dict)
            or not isinstance(theirs, dict)
            or ours.get("sha256") == theirs.get("sha256")
        ):
            return None
        return (
            f"the repository's v{number} is another build (its newest is v{newest}), and only versions newer "
            f"than v{newest} are published: number the build above it (jetinfer build --serving-repository "
            f"{self.repository}, or --version {newest + 1})"
        )

    def _verify(self, model: str, version: int) -> ModelVersion:
        """Load and verify a source version (config, manifest, file, checksum) (thread)."""
        return ModelRepository(self.source).load_version(model, version, verify_checksum=True)

    def _copy(self, source: ModelVersion) -> ModelVersion:
        """Copy a verified source version into the repository under the same number (thread)."""
        manifest = source.manifest
        copied = write_version(
            self.repository,
            source.config,
            source.model_file,
            backend=manifest.backend,
            precision=manifest.precision,
            producer=manifest.producer,
            tensorrt=manifest.tensorrt,
            version=source.version,
            expected_sha256=manifest.sha256,
            created=manifest.created or None,
        )
        if self.settings.keep_versions:
            prune_versions(self.repository, source.config.name, keep=self.settings.keep_versions)
        return copied

    def _refuse(self, result: PollResult, candidate: _Candidate, reason: str) -> None:
        key = (candidate.model, candidate.version)
        self._refused[key] = candidate.snapshot
        self._print(f"refused {candidate.model} v{candidate.version}: {reason}")
        result.refused.append(Refused(candidate.model, candidate.version, reason))

    def _print(self, line: str) -> None:
        """Say one event, once: a line on the output (the log repeats it only at DEBUG)."""
        print(f"sidecar: {line}", file=self._out, flush=True)
        logger.debug("sidecar: %s", line)

    async def _take(self, candidate: _Candidate, result: PollResult) -> Published | None:
        key = (candidate.model, candidate.version)
        try:
            source = await asyncio.to_thread(self._verify, candidate.model, candidate.version)
        except RepositoryError as exc:
            self._refuse(result, candidate, str(exc))
            return None
        except OSError as exc:
            self._refuse(result, candidate, f"cannot read: {exc}")
            return None
        try:
            copied = await asyncio.to_thread(self._copy, source)
        except (RepositoryError, OSError) as exc:
            if candidate.version in await asyncio.to_thread(
                _numeric_versions, self.repository / candidate.model
            ):
                logger.info(
                    "sidecar: %s v%d appeared in the repository meanwhile (another sidecar): %s",
                    candidate.model,
                    candidate.version,
                    exc,
                )
                return None
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            if failures >= self.settings.retries:
                self._refuse(result, candidate, f"copy failed {failures} times, giving up: {exc}")
            else:
                logger.warning(
                    "sidecar: copying %s v%d failed (attempt %d of %d), retrying next scan: %s",
                    candidate.model,
                    candidate.version,
                    failures,
                    self.settings.retries,
                    exc,
                )
            return None
        self._failures.pop(key, None)
        self._print(
            f"published {candidate.model} v{candidate.version} ({copied.manifest.backend}) -> {copied.path}"
        )
        return Published(candidate.model, candidate.version, copied.path)

    async def poll(self) -> PollResult:
        """One scan: take every complete new version, then signal the workers once per model."""
        result = PollResult()
        candidates = await asyncio.to_thread(self._scan)
        alive = {(c.model, c.version) for c in candidates}
        for table in (self._previous, self._refused, self._failures):
            for key in [k for k in table if k not in alive]:
                del table[key]
        newest: dict[str, int] = {}
        for candidate in sorted(candidates, key=lambda c: (c.model, c.version)):
            key = (candidate.model, candidate.version)
            if candidate.shadowed is not None:
                if self._refused.get(key) != candidate.snapshot:
                    self._refuse(result, candidate, candidate.shadowed)
                continue
            stable = self._previous.get(key) == candidate.snapshot
            self._previous[key] = candidate.snapshot
            if not stable:
                logger.debug("sidecar: %s v%d is still changing; waiting", *key)
                result.waiting.append(key)
                continue
            if self._refused.get(key) == candidate.snapshot:
                continue
            if self._stop.is_set():
                break
            published = await self._take(candidate, result)
            if published is not None:
                result.published.append(published)
                newest[published.model] = published.version
        if newest:
            answers = await asyncio.gather(*(self.signal(m, v) for m, v in sorted(newest.items())))
            result.answers = dict(zip(sorted(newest), answers, strict=True))
        return result

    # -- signalling --------------------------------------------------------------------------------

    async def signal(self, model: str, version: int) -> list[WorkerAnswer]:
        """Publish the reload signal for `model` and collect the workers' answers for `answer_wait_s`."""
        nc = self._nc
        if nc is None:
            raise ConnectionError("sidecar is not connected to NATS; use it as an async context manager")
        subject = reload_subject(model)
        body = json.dumps({"model": model, "version": version}).encode()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        answers: list[WorkerAnswer] = []
        try:
            delay = 0.5
            for attempt in range(1, self.settings.retries + 1):
                try:
                    await nc.publish(subject, body, reply=inbox)
                    await nc.flush(timeout=5)
                    break
                except Exception as exc:  # nats-py raises several unrelated types here
                    if attempt == self.settings.retries:
                        self._print(
                            f"{model} v{version}: reload signal not sent after {attempt} attempts: {exc} "
                            "(workers still find the version by polling the repository)"
                        )
                        return answers
                    logger.warning("sidecar: publishing %s failed (attempt %d): %s", subject, attempt, exc)
                    await self._sleep(delay)
                    delay *= 2
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.answer_wait_s
            while (remaining := deadline - loop.time()) > 0 and not self._stop.is_set():
                try:
                    message = await sub.next_msg(timeout=min(remaining, 0.25))
                except TimeoutError:
                    continue
                try:
                    answer = WorkerAnswer.parse(message.data)
                except ValueError as exc:
                    logger.warning(
                        "sidecar: unreadable answer to %s: %s: %r", subject, exc, message.data[:200]
                    )
                    continue
                answers.append(answer)
                suffix = f": {answer.message}" if answer.message else ""
                self._print(
                    f"{model} v{version}: worker {answer.worker} {answer.status} v{answer.version}{suffix}"
                )
        finally:
            await logged(logger, "sidecar: unsubscribing from the workers' answers", sub.unsubscribe())
        if not answers:
            self._print(
                f"{model} v{version}: no worker answered the reload signal within "
                f"{self.settings.answer_wait_s:g} s (workers also poll the repository)"
            )
        return answers

    # -- main loop ---------------------------------------------------------------------------------

    async def run(self) -> int:
        """Scan until stopped (or, with `once`, scan twice `poll_s` apart). Exit status: 1 if a version
        was refused in a `once` run, else 0."""
        refused = 0
        scans = 2 if self.settings.once else None
        done = 0
        error_streak = 0
        while not self._stop.is_set() and (scans is None or done < scans):
            if done:
                await self._sleep(self.settings.poll_s)
                if self._stop.is_set():
                    break
            try:
                result = await self.poll()
                refused += len(result.refused)
                error_streak = 0
            except OSError as exc:
                error_streak += 1
                log = logger.error if error_streak == 1 else logger.debug
                log(
                    "sidecar: scanning %s failed: %s (retrying every %.1f s)",
                    self.source,
                    exc,
                    self.settings.poll_s,
                )
            done += 1
        return 1 if (self.settings.once and refused) else 0


async def run_sidecar(settings: SidecarSettings, *, out: TextIO | None = None) -> int:
    """Run a sidecar until SIGTERM/SIGINT (or one pass with `once`); returns the exit status."""
    sidecar = Sidecar(settings, out=out)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    handler: Callable[[], None] = sidecar.stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
    try:
        async with sidecar:
            logger.info(
                "sidecar: watching %s every %.1f s, publishing into %s",
                settings.source,
                settings.poll_s,
                settings.repository,
            )
            return await sidecar.run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
