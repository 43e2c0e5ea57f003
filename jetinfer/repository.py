"""The model repository: Triton's layout, with a manifest per version.

::

    <repo>/<model>/config.json            inputs/outputs (shapes without the batch dim), max_batch,
                                          preprocessing, labels, version policy
    <repo>/<model>/labels.txt             optional, one label per line
    <repo>/<model>/<version>/model.<ext>  model.onnx | model.plan | model.pt2
    <repo>/<model>/<version>/manifest.json  sha256, backend, precision, specs, tool versions

A version is written into a hidden temporary folder, fsynced and renamed into place
(`write_version`), so a reader never sees half a version. Loading checks everything and raises
`RepositoryError` saying exactly what is wrong; hidden folders, invalid model names and
non-numeric version folders are skipped with a warning.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from jetinfer.errors import RepositoryError
from jetinfer.protocol import DATATYPES, MAX_NDIM, MODEL_NAME_PATTERN

__all__ = [
    "BACKEND_FILES",
    "ModelConfig",
    "ModelRepository",
    "ModelVersion",
    "PreprocessConfig",
    "TensorSpec",
    "VersionManifest",
    "prune_versions",
    "sha256_file",
    "write_version",
]

logger = logging.getLogger(__name__)

#: Model file name -> backend that serves it.
BACKEND_FILES: Final[Mapping[str, str]] = {
    "model.onnx": "onnxruntime",
    "model.plan": "tensorrt",
    "model.pt2": "torch",
}
FILE_OF_BACKEND: Final = {backend: name for name, backend in BACKEND_FILES.items()}
MANIFEST_FORMAT: Final = 1


def _require(condition: bool, path: object, message: str) -> None:
    if not condition:
        raise RepositoryError(path, message)


def sha256_file(path: Path, chunk_bytes: int = 4 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, wire datatype, and shape *without* the batch dimension (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, obj: object, where: str) -> TensorSpec:
        """Validate and build a spec from its JSON form."""
        _require(isinstance(obj, dict), where, "must be an object with name, datatype, shape")
        assert isinstance(obj, dict)
        name, datatype, shape = obj.get("name"), obj.get("datatype"), obj.get("shape")
        _require(isinstance(name, str) and bool(name), where, "name must be a non-empty string")
        _require(datatype in DATATYPES, where, f"datatype {datatype!r} must be one of {sorted(DATATYPES)}")
        _require(
            isinstance(shape, list)
            and len(shape) < MAX_NDIM
            and all(type(d) is int and (d == -1 or d > 0) for d in shape),
            where,
            f"shape {shape!r} must be a list of positive integers or -1, without the batch dimension",
        )
        assert isinstance(name, str)
        assert isinstance(datatype, str)
        assert isinstance(shape, list)
        return cls(name=name, datatype=datatype, shape=tuple(shape))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether a per-frame `shape` (no batch dimension) fits this spec."""
        return len(shape) == len(self.shape) and all(
            s == -1 or s == d for s, d in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class PreprocessConfig:
    """How an encoded image request becomes the model's input tensor."""

    input: str
    width: int
    height: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    datatype: str = "FP32"
    resize: Literal["bilinear", "nearest", "bicubic"] = "bilinear"
    center_crop: float = 1.0

    @classmethod
    def from_dict(cls, obj: object, where: str) -> PreprocessConfig:
        """Validate and build from JSON."""
        _require(isinstance(obj, dict), where, "must be an object")
        assert isinstance(obj, dict)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(obj) - known
        _require(not unknown, where, f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
        try:
            config = cls(
                input=str(obj["input"]),
                width=int(obj["width"]),
                height=int(obj["height"]),
                mean=tuple(float(v) for v in obj.get("mean", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
                std=tuple(float(v) for v in obj.get("std", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
                layout=obj.get("layout", "NCHW"),
                datatype=obj.get("datatype", "FP32"),
                resize=obj.get("resize", "bilinear"),
                center_crop=float(obj.get("center_crop", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryError(where, f"invalid preprocessing: {exc}") from None
        _require(1 <= config.width <= 8192 and 1 <= config.height <= 8192, where, "width/height out of range")
        _require(len(config.mean) == 3 and len(config.std) == 3, where, "mean and std need 3 values")
        _require(all(s != 0 for s in config.std), where, "std values must not be 0")
        _require(config.layout in ("NCHW", "NHWC"), where, "layout must be NCHW or NHWC")
        _require(config.datatype in ("FP32", "FP16", "UINT8"), where, "datatype must be FP32, FP16 or UINT8")
        _require(
            config.resize in ("bilinear", "nearest", "bicubic"),
            where,
            "resize must be bilinear|nearest|bicubic",
        )
        _require(0.1 <= config.center_crop <= 1.0, where, "center_crop must be within 0.1..1.0")
        return config


@dataclass(frozen=True)
class ModelConfig:
    """A model's config.json: what it takes, what it gives, and how requests are prepared."""

    name: str
    max_batch: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: PreprocessConfig | None = None
    labels: tuple[str, ...] = ()
    version_policy: Mapping[str, Any] = field(default_factory=lambda: {"latest": 1})
    warmup: bool = True

    @classmethod
    def from_dict(cls, obj: object, *, where: object, labels: Sequence[str] = ()) -> ModelConfig:
        """Validate and build from JSON."""
        _require(isinstance(obj, dict), where, "config must be a JSON object")
        assert isinstance(obj, dict)
        name = obj.get("name")
        _require(
            isinstance(name, str) and bool(MODEL_NAME_PATTERN.fullmatch(name)),
            where,
            f"name {name!r} must match [a-z0-9_-]{{1,64}}",
        )
        max_batch = obj.get("max_batch")
        _require(
            type(max_batch) is int and 1 <= max_batch <= 4096, where, "max_batch must be an integer 1..4096"
        )
        raw_inputs, raw_outputs = obj.get("inputs"), obj.get("outputs")
        _require(isinstance(raw_inputs, list) and bool(raw_inputs), where, "inputs must be a non-empty list")
        _require(
            isinstance(raw_outputs, list) and bool(raw_outputs), where, "outputs must be a non-empty list"
        )
        assert isinstance(raw_inputs, list)
        assert isinstance(raw_outputs, list)
        inputs = tuple(TensorSpec.from_dict(t, f"{where}: inputs[{i}]") for i, t in enumerate(raw_inputs))
        outputs = tuple(TensorSpec.from_dict(t, f"{where}: outputs[{i}]") for i, t in enumerate(raw_outputs))
        preprocess = None
        if obj.get("preprocess") is not None:
            preprocess = PreprocessConfig.from_dict(obj["preprocess"], f"{where}: preprocess")
            _require(
                preprocess.input in {t.name for t in inputs},
                where,
                f"preprocess.input {preprocess.input!r} is not one of the inputs",
            )
        policy = obj.get("version_policy", {"latest": 1})
        _require(
            isinstance(policy, dict)
            and (
                (set(policy) == {"latest"} and type(policy["latest"]) is int and policy["latest"] >= 1)
                or (
                    set(policy) == {"specific"}
                    and isinstance(policy["specific"], list)
                    and all(type(v) is int and v >= 1 for v in policy["specific"])
                )
            ),
            where,
            'version_policy must be {"latest": N} or {"specific": [versions]}',
        )
        assert isinstance(name, str)
        assert isinstance(max_batch, int)
        return cls(
            name=name,
            max_batch=max_batch,
            inputs=inputs,
            outputs=outputs,
            preprocess=preprocess,
            labels=tuple(labels),
            version_policy=policy,
            warmup=bool(obj.get("warmup", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (labels live in labels.txt)."""
        out: dict[str, Any] = {
            "name": self.name,
            "max_batch": self.max_batch,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "version_policy": dict(self.version_policy),
            "warmup": self.warmup,
        }
        if self.preprocess is not None:
            out["preprocess"] = {
                **asdict(self.preprocess),
                "mean": list(self.preprocess.mean),
                "std": list(self.preprocess.std),
            }
        if self.labels:
            out["labels"] = "labels.txt"
        return out

    def input_spec(self, name: str) -> TensorSpec:
        """The spec of input `name`."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def allowed_versions(self, available: Sequence[int]) -> list[int]:
        """The versions the policy serves, newest first."""
        ordered = sorted(available, reverse=True)
        if "specific" in self.version_policy:
            wanted = set(self.version_policy["specific"])
            return [v for v in ordered if v in wanted]
        return ordered[: int(self.version_policy.get("latest", 1))]


@dataclass(frozen=True)
class VersionManifest:
    """A version's manifest.json."""

    model_file: str
    sha256: str
    backend: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created: str = ""
    producer: Mapping[str, str] = field(default_factory=dict)
    tensorrt: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, obj: object, where: object) -> VersionManifest:
        """Validate and build from JSON."""
        _require(isinstance(obj, dict), where, "manifest must be a JSON object")
        assert isinstance(obj, dict)
        _require(obj.get("format") == MANIFEST_FORMAT, where, f"format must be {MANIFEST_FORMAT}")
        model_file = obj.get("model_file")
        _require(
            model_file in BACKEND_FILES,
            where,
            f"model_file {model_file!r} must be one of {list(BACKEND_FILES)}",
        )
        assert isinstance(model_file, str)
        backend = obj.get("backend")
        _require(
            backend == BACKEND_FILES[model_file],
            where,
            f"backend {backend!r} does not match {model_file} (expected {BACKEND_FILES[model_file]!r})",
        )
        sha = obj.get("sha256")
        _require(
            isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
            where,
            "sha256 must be 64 lowercase hex digits",
        )
        assert isinstance(sha, str)
        assert isinstance(backend, str)
        for key in ("inputs", "outputs"):
            _require(isinstance(obj.get(key, []), list), where, f"{key} must be a list of tensor specs")
        producer, tensorrt = obj.get("producer", {}), obj.get("tensorrt", {})
        _require(isinstance(producer, dict), where, "producer must be an object of tool versions")
        _require(isinstance(tensorrt, dict), where, "tensorrt must be an object")
        assert isinstance(producer, dict)
        assert isinstance(tensorrt, dict)
        return cls(
            model_file=model_file,
            sha256=sha,
            backend=backend,
            precision=str(obj.get("precision", "fp32")),
            inputs=tuple(
                TensorSpec.from_dict(t, f"{where}: inputs[{i}]") for i, t in enumerate(obj.get("inputs", []))
            ),
            outputs=tuple(
                TensorSpec.from_dict(t, f"{where}: outputs[{i}]")
                for i, t in enumerate(obj.get("outputs", []))
            ),
            created=str(obj.get("created", "")),
            producer={str(k): str(v) for k, v in producer.items()},
            tensorrt={str(k): str(v) for k, v in tensorrt.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        out: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "model_file": self.model_file,
            "sha256": self.sha256,
            "backend": self.backend,
            "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "created": self.created,
            "producer": dict(self.producer),
        }
        if self.tensorrt:
            out["tensorrt"] = dict(self.tensorrt)
        return out


@dataclass(frozen=True)
class ModelVersion:
    """A validated version on disk, ready for a backend to load."""

    config: ModelConfig
    manifest: VersionManifest
    version: int
    path: Path

    @property
    def model_file(self) -> Path:
        """The model file (model.onnx, model.plan or model.pt2)."""
        return self.path / self.manifest.model_file

    @property
    def backend(self) -> str:
        """The backend that serves this version."""
        return self.manifest.backend


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RepositoryError(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(path, f"not valid JSON: {exc}") from None


class ModelRepository:
    """Read access to a model repository folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def model_dir(self, model: str) -> Path:
        """The folder of `model`; refuses names that are not plain model names (no path traversal)."""
        _require(
            bool(MODEL_NAME_PATTERN.fullmatch(model)),
            model,
            "invalid model name: must match [a-z0-9_-]{1,64}",
        )
        return self.root / model

    def models(self) -> list[str]:
        """Names of model folders that have a config.json; others are skipped with a warning."""
        if not self.root.is_dir():
            return []
        names = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if not MODEL_NAME_PATTERN.fullmatch(entry.name):
                logger.warning("repository: ignoring %s: not a valid model name ([a-z0-9_-]{1,64})", entry)
                continue
            if not (entry / "config.json").is_file():
                logger.warning("repository: ignoring %s: no config.json", entry)
                continue
            names.append(entry.name)
        return names

    def config(self, model: str) -> ModelConfig:
        """Load and validate `<model>/config.json` (and labels.txt if the config names it)."""
        folder = self.model_dir(model)
        path = folder / "config.json"
        obj = _read_json(path)
        labels: list[str] = []
        if isinstance(obj, dict) and obj.get("labels"):
            label_name = obj["labels"]
            _require(
                isinstance(label_name, str) and "/" not in label_name and not label_name.startswith("."),
                path,
                "labels must be a plain file name in the model folder",
            )
            try:
                labels = (folder / label_name).read_text().splitlines()
            except OSError as exc:
                raise RepositoryError(folder / label_name, f"cannot read labels: {exc}") from None
        config = ModelConfig.from_dict(obj, where=path, labels=labels)
        _require(config.name == model, path, f"name {config.name!r} differs from its folder name {model!r}")
        return config

    def versions(self, model: str) -> list[int]:
        """Numeric version folders of `model`, ascending; hidden and non-numeric ones are skipped."""
        folder = self.model_dir(model)
        found = []
        if not folder.is_dir():
            return []
        for entry in folder.iterdir():
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if not entry.name.isdigit() or entry.name.startswith("0"):
                logger.warning("repository: ignoring %s: version folders are positive integers", entry)
                continue
            found.append(int(entry.name))
        return sorted(found)

    def load_version(self, model: str, version: int, *, verify_checksum: bool = True) -> ModelVersion:
        """Validate one version: config, manifest, file present, checksum, specs agree."""
        config = self.config(model)
        path = self.model_dir(model) / str(version)
        _require(path.is_dir(), path, "no such version folder")
        manifest = VersionManifest.from_dict(_read_json(path / "manifest.json"), path / "manifest.json")
        model_file = path / manifest.model_file
        _require(model_file.is_file(), model_file, "model file missing")
        if verify_checksum:
            actual = sha256_file(model_file)
            _require(
                actual == manifest.sha256,
                model_file,
                f"checksum mismatch: manifest says {manifest.sha256[:12]}…, file is {actual[:12]}…",
            )
        if manifest.inputs:
            names = sorted(t.name for t in manifest.inputs)
            _require(
                names == sorted(t.name for t in config.inputs),
                path,
                f"manifest inputs {names} differ from config inputs",
            )
        return ModelVersion(config=config, manifest=manifest, version=version, path=path)

    def candidates(self, model: str) -> list[int]:
        """Versions the model's policy would serve, newest first."""
        return self.config(model).allowed_versions(self.versions(model))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_version(
    root: Path | str,
    config: ModelConfig,
    model_file: Path,
    *,
    backend: str | None = None,
    precision: str = "fp32",
    producer: Mapping[str, str] | None = None,
    tensorrt: Mapping[str, str] | None = None,
    version: int | None = None,
    keep: int | None = None,
    expected_sha256: str | None = None,
    created: str | None = None,
) -> ModelVersion:
    """Write a new version atomically: hidden temp folder, fsync, rename. Returns the new version.

    `config.json` (and labels.txt) are (re)written atomically too. `version` picks the number (default:
    one above the newest); `keep` removes all but the newest `keep` versions afterwards (each is renamed
    to a hidden folder first, so a reader never sees half a removed version). `expected_sha256` refuses
    the copy unless the copied file has that checksum (a source that changed while it was copied);
    `created` keeps a manifest's original creation time.
    """
    root = Path(root)
    _require(keep is None or keep >= 1, root, f"keep must be at least 1, not {keep}")
    _require(version is None or version >= 1, root, f"version must be a positive integer, not {version}")
    suffix = model_file.suffix
    target_name = f"model{suffix}"
    _require(
        target_name in BACKEND_FILES, model_file, f"model files end in {sorted({'.onnx', '.plan', '.pt2'})}"
    )
    wanted_backend = BACKEND_FILES[target_name]
    _require(
        backend in (None, wanted_backend),
        model_file,
        f"{target_name} is served by {wanted_backend}, not {backend}",
    )
    repo = ModelRepository(root)
    folder = repo.model_dir(config.name)
    folder.mkdir(parents=True, exist_ok=True)
    if config.labels:
        _replace_file(folder / "labels.txt", ("\n".join(config.labels) + "\n").encode())
    _replace_file(folder / "config.json", json.dumps(config.to_dict(), indent=2).encode())
    existing = repo.versions(config.name)
    number = version if version is not None else (max(existing) + 1 if existing else 1)
    _require(number not in existing, folder / str(number), "version exists already")
    tmp = folder / f".tmp-{number}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shutil.copyfile(model_file, tmp / target_name)
        with open(tmp / target_name, "rb+") as handle:
            os.fsync(handle.fileno())
        digest = sha256_file(tmp / target_name)
        _require(
            expected_sha256 is None or digest == expected_sha256,
            model_file,
            f"checksum mismatch: expected {str(expected_sha256)[:12]}…, the copy is {digest[:12]}…",
        )
        manifest = VersionManifest(
            model_file=target_name,
            sha256=digest,
            backend=wanted_backend,
            precision=precision,
            inputs=config.inputs,
            outputs=config.outputs,
            created=created or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            producer=dict(producer or {}),
            tensorrt=dict(tensorrt or {}),
        )
        _write_synced(tmp / "manifest.json", json.dumps(manifest.to_dict(), indent=2).encode())
        _fsync_dir(tmp)
        try:
            os.rename(tmp, folder / str(number))
        except OSError as exc:
            if (folder / str(number)).exists():
                raise RepositoryError(folder / str(number), "version exists already") from None
            raise RepositoryError(folder / str(number), f"cannot rename into place: {exc}") from exc
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune_versions(root, config.name, keep=keep)
    return ModelVersion(config=config, manifest=manifest, version=number, path=folder / str(number))


def prune_versions(root: Path | str, model: str, *, keep: int) -> list[int]:
    """Remove all but the newest `keep` versions of `model`; returns the removed version numbers.

    Each old version is first renamed to a hidden folder (atomic: readers skip hidden folders), then
    deleted, so a reader never sees half a version.
    """
    _require(keep >= 1, root, f"keep must be at least 1, not {keep}")
    repo = ModelRepository(root)
    folder = repo.model_dir(model)
    removed = []
    for old in repo.versions(model)[:-keep]:
        doomed = folder / f".del-{old}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder / str(old), doomed)
        except OSError as exc:
            logger.warning("repository: cannot remove %s: %s", folder / str(old), exc)
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old)
    if removed:
        _fsync_dir(folder)
        logger.info("repository: %s: removed old versions %s (keep %d)", model, removed, keep)
    return removed


def _replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    _write_synced(tmp, data)
    os.replace(tmp, path)
