"""docs/operations.md's roll-out, followed literally: a build into `incoming/` (or built elsewhere and
copied there) is numbered above the serving repository's newest, and a version the sidecar can never
publish is refused with the fix instead of ignored in silence (issue 16.7)."""

from __future__ import annotations

import shutil
from pathlib import Path

from jetinfer.builder.demo_models import write_identity_onnx
from jetinfer.repository import ModelRepository
from tests.conftest import NatsUnderTest, run_cli


def _sidecar_once(url: str, incoming: Path, repository: Path) -> tuple[int, str]:
    result = run_cli(
        "sidecar",
        "--once",
        "--source",
        str(incoming),
        "--repository",
        str(repository),
        "--nats-url",
        url,
        "--poll-s",
        "0.2",
        "--answer-wait-s",
        "0.2",
    )
    return result.returncode, result.stdout + result.stderr


def _copy_into_incoming(built: Path, incoming_model: Path, number: int) -> None:
    """The docs' `cd incoming/<model> && cp -r /tmp/build/<model>/N .N && mv .N N`."""
    incoming_model.mkdir(parents=True, exist_ok=True)
    shutil.copytree(built, incoming_model / f".{number}")
    (incoming_model / f".{number}").rename(incoming_model / str(number))
    shutil.copy(built.parent / "config.json", incoming_model / "config.json")


def test_the_roll_out_of_the_docs_numbers_from_the_serving_repository(
    nats_server: NatsUnderTest, tmp_path: Path, unique: str
) -> None:
    model = f"rolled-{unique}"
    onnx = tmp_path / "model.onnx"
    write_identity_onnx(onnx)
    incoming, repository, ci = tmp_path / "incoming", tmp_path / "repository", tmp_path / "build"
    repository.mkdir()
    build = ["build", str(onnx), "--name", model, "--serving-repository", str(repository)]

    # 1. Build into incoming/ (docs: "Build into incoming/"); 2. the sidecar publishes it.
    first = run_cli(*build, "--repository", str(incoming))
    assert first.returncode == 0, first.stderr
    assert f"built {model} v1" in first.stdout
    status, said = _sidecar_once(nats_server.url, incoming, repository)
    assert status == 0, said
    assert f"published {model} v1" in said

    # Built in CI (a fresh folder), then copied into incoming/ as the docs show.
    second = run_cli(*build, "--repository", str(ci))
    assert second.returncode == 0, second.stderr
    assert f"built {model} v2" in second.stdout, "numbered from the serving repository, not from build/"
    _copy_into_incoming(ci / model / "2", incoming / model, 2)
    status, said = _sidecar_once(nats_server.url, incoming, repository)
    assert status == 0, said
    assert f"published {model} v2" in said
    assert ModelRepository(repository).versions(model) == [1, 2]

    # A --version the serving repository already passed is refused with the fix, before anything is built.
    stale = run_cli(*build, "--repository", str(ci), "--version", "2")
    assert stale.returncode == 2
    assert "not newer than the serving repository's newest (v2)" in stale.stderr
    assert "--version 3" in stale.stderr


def _rebuild(onnx_file: Path) -> None:
    """Another build of the same model: the same graph in a different file."""
    import onnx

    graph = onnx.load(str(onnx_file))
    graph.doc_string = "rebuilt"
    onnx.save(graph, str(onnx_file))


def test_a_build_numbered_from_the_wrong_folder_is_refused_with_the_fix(
    nats_server: NatsUnderTest, tmp_path: Path, unique: str
) -> None:
    model = f"shadow-{unique}"
    onnx = tmp_path / "model.onnx"
    write_identity_onnx(onnx)
    incoming, repository = tmp_path / "incoming", tmp_path / "repository"
    assert run_cli("build", str(onnx), "--name", model, "--repository", str(incoming)).returncode == 0
    assert _sidecar_once(nats_server.url, incoming, repository)[0] == 0
    shutil.rmtree(incoming)  # a fresh incoming/ (a new volume, or cleaned up): numbering starts again
    _rebuild(onnx)
    rebuilt = run_cli("build", str(onnx), "--name", model, "--repository", str(incoming))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"built {model} v1" in rebuilt.stdout  # without --serving-repository it cannot know better
    status, said = _sidecar_once(nats_server.url, incoming, repository)
    assert status == 1, said
    (line,) = [line for line in said.splitlines() if f"refused {model} v1" in line]
    assert "another build" in line
    assert f"--serving-repository {repository}" in line
    assert "--version 2" in line
