"""The model repository format, `write_version`, and `jetinfer models` on every kind of broken entry."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from jetinfer.builder import cli as builder_cli
from jetinfer.builder.demo_models import identity_config, write_identity_onnx
from jetinfer.builder.models import inspect_repository
from jetinfer.errors import RepositoryError
from jetinfer.repository import ModelRepository, prune_versions, sha256_file, write_version


def run_models(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="jetinfer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    builder_cli.register(subparsers)
    args = parser.parse_args(["models", *argv])
    return int(args.handler(args))


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "identity.onnx"
    path.parent.mkdir()
    write_identity_onnx(path)
    return path


@pytest.fixture
def repo(tmp_path: Path, onnx_file: Path) -> Path:
    """A repository with identity v1..v3, all valid."""
    root = tmp_path / "repo"
    for _ in range(3):
        write_version(root, identity_config(), onnx_file, backend="onnxruntime")
    return root


# -- write_version -------------------------------------------------------------------------------------


def test_write_version_numbers_and_manifest(repo: Path, onnx_file: Path) -> None:
    repository = ModelRepository(repo)
    assert repository.models() == ["identity"]
    assert repository.versions("identity") == [1, 2, 3]
    version = repository.load_version("identity", 3)
    assert version.manifest.sha256 == sha256_file(onnx_file)
    assert version.manifest.backend == "onnxruntime"
    assert version.model_file == repo / "identity" / "3" / "model.onnx"
    assert [p.name for p in (repo / "identity").iterdir() if p.name.startswith(".")] == []


def test_write_version_refuses_an_existing_number_and_a_wrong_backend(repo: Path, onnx_file: Path) -> None:
    with pytest.raises(RepositoryError, match="version exists already"):
        write_version(repo, identity_config(), onnx_file, version=2)
    with pytest.raises(RepositoryError, match="served by onnxruntime, not tensorrt"):
        write_version(repo, identity_config(), onnx_file, backend="tensorrt")
    with pytest.raises(RepositoryError, match="keep must be at least 1"):
        write_version(repo, identity_config(), onnx_file, keep=0)
    assert ModelRepository(repo).versions("identity") == [1, 2, 3]


def test_write_version_with_a_wrong_expected_checksum_leaves_nothing(repo: Path, onnx_file: Path) -> None:
    with pytest.raises(RepositoryError, match="checksum mismatch"):
        write_version(repo, identity_config(), onnx_file, version=7, expected_sha256="0" * 64)
    assert ModelRepository(repo).versions("identity") == [1, 2, 3]
    assert [p.name for p in (repo / "identity").iterdir() if p.name.startswith(".")] == []


def test_write_version_keeps_an_explicit_number_and_creation_time(repo: Path, onnx_file: Path) -> None:
    written = write_version(
        repo, identity_config(), onnx_file, version=10, created="2024-01-02T03:04:05+00:00"
    )
    assert written.version == 10
    loaded = ModelRepository(repo).load_version("identity", 10)
    assert loaded.manifest.created == "2024-01-02T03:04:05+00:00"


def test_prune_versions_keeps_the_newest(repo: Path) -> None:
    assert prune_versions(repo, "identity", keep=2) == [1]
    assert ModelRepository(repo).versions("identity") == [2, 3]
    assert prune_versions(repo, "identity", keep=5) == []


def test_path_traversal_names_are_refused(repo: Path) -> None:
    repository = ModelRepository(repo)
    for name in ("../etc", "..", "a/b", ".hidden", "UPPER", ""):
        with pytest.raises(RepositoryError, match="invalid model name"):
            repository.model_dir(name)
    config = json.loads((repo / "identity" / "config.json").read_text())
    config["labels"] = "../../../etc/passwd"
    (repo / "identity" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RepositoryError, match="labels must be a plain file name"):
        repository.config("identity")


# -- jetinfer models -----------------------------------------------------------------------------------


def _version(report_json: dict[str, object], model: str, version: int) -> dict[str, object]:
    models = {m["name"]: m for m in report_json["models"]}  # type: ignore[attr-defined]
    return {v["version"]: v for v in models[model]["versions"]}[version]  # type: ignore[no-any-return]


def test_models_lists_a_healthy_repository(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_models("--repository", str(repo)) == 0
    out = capsys.readouterr().out
    assert "identity  max_batch 256  serving v3" in out
    assert "onnxruntime" in out
    assert "INVALID" not in out


def test_models_reports_a_corrupt_model_file(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_file = repo / "identity" / "3" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-1] + b"\x00")
    assert run_models("--repository", str(repo), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    broken = _version(report, "identity", 3)
    assert broken["valid"] is False
    assert "checksum mismatch" in str(broken["problem"])
    # version_policy {"latest": 1}: only the newest may serve, as in the worker, so nothing would.
    assert report["models"][0]["serving"] is None
    assert "no valid version allowed by the version policy" in report["models"][0]["problem"]
    assert report["ok"] is False


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("wrong_backend", "backend 'tensorrt' does not match model.onnx"),
        ("missing_manifest", "manifest.json: missing"),
        ("bad_json", "not valid JSON"),
        ("missing_file", "model file missing"),
        ("not_an_object", "manifest must be a JSON object"),
        ("bad_inputs", "inputs must be a list"),
    ],
)
def test_models_reports_each_broken_manifest(
    repo: Path, capsys: pytest.CaptureFixture[str], damage: str, expected: str
) -> None:
    folder = repo / "identity" / "3"
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "wrong_backend":
        manifest["backend"] = "tensorrt"
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "missing_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "bad_json":
        (folder / "manifest.json").write_text('{"format": 1,')
    elif damage == "missing_file":
        (folder / "model.onnx").unlink()
    elif damage == "not_an_object":
        (folder / "manifest.json").write_text("[1, 2]")
    elif damage == "bad_inputs":
        manifest["inputs"] = {"name": "input"}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    config = json.loads((repo / "identity" / "config.json").read_text())
    config["version_policy"] = {"latest": 2}  # v2 may serve when v3 is broken
    (repo / "identity" / "config.json").write_text(json.dumps(config))
    assert run_models("--repository", str(repo)) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out
    row = next(line for line in out.splitlines() if line.strip().startswith("3 "))
    assert "INVALID" in row
    assert expected in row
    assert "serving v2" in out


def test_models_ignores_invalid_names_and_non_numeric_versions_with_a_warning(
    repo: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    (repo / "Bad Name").mkdir()
    (repo / "Bad Name" / "config.json").write_text("{}")
    (repo / "dots..x").mkdir()
    (repo / "identity" / "latest").mkdir()
    (repo / "identity" / "007").mkdir()
    (repo / "identity" / ".tmp-4-deadbeef").mkdir()
    with caplog.at_level(logging.WARNING, logger="jetinfer.builder.models"):
        assert run_models("--repository", str(repo), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    ignored = {Path(entry["path"]).name: entry["reason"] for entry in report["ignored"]}
    assert "invalid model name" in ignored["Bad Name"]
    assert "invalid model name" in ignored["dots..x"]
    assert "positive integers" in ignored["latest"]
    assert "positive integers" in ignored["007"]
    assert "interrupted write" in ignored[".tmp-4-deadbeef"]
    assert [m["name"] for m in report["models"]] == ["identity"]
    assert [v["version"] for v in report["models"][0]["versions"]] == [3, 2, 1]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("Bad Name", "dots..x", "latest", "007"):
        assert name in warned
    # The worker's reader skips them the same way.
    assert ModelRepository(repo).models() == ["identity"]
    assert ModelRepository(repo).versions("identity") == [1, 2, 3]


def test_models_reports_a_broken_config(repo: Path) -> None:
    (repo / "identity" / "config.json").write_text(json.dumps({"name": "identity", "max_batch": 0}))
    (repo / "noconfig" / "1").mkdir(parents=True)
    report = inspect_repository(repo)
    models = {m.name: m for m in report.models}
    assert "max_batch must be an integer" in str(models["identity"].problem)
    assert models["identity"].serving is None
    assert all("config is invalid" in str(v.problem) for v in models["identity"].versions)
    assert "config.json: missing" in str(models["noconfig"].problem)
    assert not report.ok


def test_models_on_a_missing_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_models("--repository", str(tmp_path / "nope")) == 2
    assert "no such folder" in capsys.readouterr().out


def test_models_follows_the_version_policy(repo: Path) -> None:
    config = json.loads((repo / "identity" / "config.json").read_text())
    config["version_policy"] = {"specific": [1, 2]}
    (repo / "identity" / "config.json").write_text(json.dumps(config))
    report = inspect_repository(repo)
    assert report.models[0].serving == 2
    assert report.ok
