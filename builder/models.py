"""`jetinfer models`: what a model repository holds, which version would serve, and what is wrong.

`inspect_repository` never raises for a broken entry: every problem (checksum mismatch, bad or missing
manifest, backend mismatch, missing model file, invalid config) becomes a line of the report, and
entries a worker ignores (invalid model names, non-numeric version folders) are listed as ignored
with a logged warning. Leftover hidden folders of interrupted writes are listed too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jetinfer.errors import RepositoryError
from jetinfer.protocol import MODEL_NAME_PATTERN
from jetinfer.repository import BACKEND_FILES, ModelConfig, ModelRepository

__all__ = [
    "IgnoredEntry",
    "ModelReport",
    "RepositoryReport",
    "VersionReport",
    "format_bytes",
    "format_report",
    "inspect_repository",
]

logger = logging.getLogger(__name__)


def format_bytes(size: int) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover - the loop always returns


@dataclass
class VersionReport:
    """One numeric version folder."""

    version: int
    path: str
    valid: bool
    problem: str | None = None
    backend: str | None = None
    precision: str | None = None
    model_file: str | None = None
    size_bytes: int = 0
    created: str | None = None
    tensorrt: dict[str, str] = field(default_factory=dict)
    serving: bool = False


@dataclass
class ModelReport:
    """One model folder: its config, its versions (newest first) and the version that would serve."""

    name: str
    path: str
    problem: str | None = None
    max_batch: int | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    version_policy: dict[str, Any] = field(default_factory=dict)
    versions: list[VersionReport] = field(default_factory=list)
    serving: int | None = None

    @property
    def ok(self) -> bool:
        """No problem with the config or any version, and a version would serve."""
        return self.problem is None and self.serving is not None and all(v.valid for v in self.versions)


@dataclass
class IgnoredEntry:
    """A folder a worker skips, and why."""

    path: str
    reason: str


@dataclass
class RepositoryReport:
    """The whole repository."""

    root: str
    models: list[ModelReport] = field(default_factory=list)
    ignored: list[IgnoredEntry] = field(default_factory=list)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """Whether every model is fine (ignored entries are reported, but do not count as problems)."""
        return self.problem is None and all(m.ok for m in self.models)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``jetinfer models --json``)."""
        return {
            "root": self.root,
            "ok": self.ok,
            "problem": self.problem,
            "models": [{**asdict(m), "ok": m.ok} for m in self.models],
            "ignored": [asdict(i) for i in self.ignored],
        }


def _raw_manifest(path: Path) -> dict[str, Any]:
    """The manifest as far as it parses, for display of a broken one."""
    try:
        obj = json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _version_report(
    repo: ModelRepository, model: str, number: int, config_ok: bool, verify: bool
) -> VersionReport:
    path = repo.model_dir(model) / str(number)
    raw = _raw_manifest(path)
    model_file = raw.get("model_file") if raw.get("model_file") in BACKEND_FILES else None
    if model_file is None:
        present = [name for name in BACKEND_FILES if (path / name).is_file()]
        model_file = present[0] if present else None
    size = (path / model_file).stat().st_size if model_file and (path / model_file).is_file() else 0
    report = VersionReport(
        version=number,
        path=str(path),
        valid=False,
        backend=str(raw["backend"]) if "backend" in raw else None,
        precision=str(raw["precision"]) if "precision" in raw else None,
        model_file=model_file,
        size_bytes=size,
        created=str(raw["created"]) if "created" in raw else None,
    )
    if not config_ok:
        report.problem = "not checked: the model's config is invalid"
        return report
    try:
        version = repo.load_version(model, number, verify_checksum=verify)
    except RepositoryError as exc:
        report.problem = (
            exc.message if str(exc.path) == str(path) else f"{_short(exc.path, path)}: {exc.message}"
        )
        return report
    except OSError as exc:
        report.problem = f"cannot read: {exc}"
        return report
    report.valid = True
    report.backend = version.manifest.backend
    report.precision = version.manifest.precision
    report.tensorrt = dict(version.manifest.tensorrt)
    return report


def _short(where: object, version_path: Path) -> str:
    text = str(where)
    prefix = str(version_path) + "/"
    return text[len(prefix) :] if text.startswith(prefix) else text


def _model_report(repo: ModelRepository, folder: Path, report: RepositoryReport, verify: bool) -> ModelReport:
    model = ModelReport(name=folder.name, path=str(folder))
    config: ModelConfig | None = None
    try:
        config = repo.config(folder.name)
    except RepositoryError as exc:
        model.problem = f"config: {exc}"
    if config is not None:
        model.max_batch = config.max_batch
        model.inputs = [t.to_dict() for t in config.inputs]
        model.outputs = [t.to_dict() for t in config.outputs]
        model.version_policy = dict(config.version_policy)
    numbers = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith("."):
            if entry.name.startswith((".tmp-", ".del-")):
                report.ignored.append(
                    IgnoredEntry(str(entry), "leftover of an interrupted write or removal; safe to delete")
                )
            continue
        if not entry.name.isdigit() or entry.name.startswith("0"):
            reason = "not a version folder: version folders are positive integers"
            logger.warning("models: ignoring %s: %s", entry, reason)
            report.ignored.append(IgnoredEntry(str(entry), reason))
            continue
        numbers.append(int(entry.name))
    for number in sorted(numbers, reverse=True):
        model.versions.append(_version_report(repo, folder.name, number, config is not None, verify))
    if config is not None:
        valid = {v.version for v in model.versions if v.valid}
        for candidate in config.allowed_versions(numbers):
            if candidate in valid:
                model.serving = candidate
                break
        for version in model.versions:
            version.serving = version.version == model.serving
        if model.serving is None and model.problem is None:
            model.problem = "no version would serve: " + (
                "no version folders" if not numbers else "no valid version allowed by the version policy"
            )
    return model


def inspect_repository(root: Path | str, *, verify_checksums: bool = True) -> RepositoryReport:
    """Check everything in the repository at `root`; broken entries become problems in the report."""
    root = Path(root)
    report = RepositoryReport(root=str(root))
    if not root.is_dir():
        report.problem = "no such folder" if not root.exists() else "not a folder"
        return report
    repo = ModelRepository(root)
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            continue
        if not MODEL_NAME_PATTERN.fullmatch(entry.name):
            reason = "invalid model name: model names match [a-z0-9_-]{1,64}"
            logger.warning("models: ignoring %s: %s", entry, reason)
            report.ignored.append(IgnoredEntry(str(entry), reason))
            continue
        try:
            report.models.append(_model_report(repo, entry, report, verify_checksums))
        except OSError as exc:
            report.models.append(ModelReport(name=entry.name, path=str(entry), problem=f"cannot read: {exc}"))
    return report


def format_report(report: RepositoryReport) -> str:
    """The report as text: one block per model, one row per version, then the ignored entries."""
    lines = [f"repository {report.root}: {len(report.models)} model(s)"]
    if report.problem:
        lines.append(f"  error: {report.problem}")
    for model in report.models:
        head = f"\n{model.name}"
        if model.max_batch is not None:
            head += f"  max_batch {model.max_batch}"
        head += f"  serving v{model.serving}" if model.serving is not None else "  serving: none"
        lines.append(head)
        if model.problem:
            lines.append(f"  problem: {model.problem}")
        if model.versions:
            rows = [("VERSION", "BACKEND", "PRECISION", "SIZE", "STATUS")]
            for v in model.versions:
                status = ("serving" if v.serving else "ok") if v.valid else f"INVALID: {v.problem}"
                rows.append(
                    (
                        str(v.version),
                        v.backend or "?",
                        v.precision or "?",
                        format_bytes(v.size_bytes) if v.size_bytes else "-",
                        status,
                    )
                )
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            for row in rows:
                cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:4])]
                lines.append("  " + "  ".join([*cells, row[4]]))
    if report.ignored:
        lines.append("\nignored:")
        lines.extend(f"  {entry.path}: {entry.reason}" for entry in report.ignored)
    return "\n".join(lines)
