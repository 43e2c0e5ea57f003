"""The sidecar with a real nats-server: complete versions are copied and signalled, broken or
half-copied ones are not, and every worker's answer is collected."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest

from jetinfer.builder import cli as builder_cli
from jetinfer.builder.demo_models import identity_config, write_identity_onnx
from jetinfer.builder.sidecar import Sidecar, SidecarSettings, WorkerAnswer
from jetinfer.errors import SettingsError
from jetinfer.repository import ModelRepository, ModelVersion, write_version
from jetinfer.streams import reload_subject

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "identity.onnx"
    write_identity_onnx(path)
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    source, repo = tmp_path / "source", tmp_path / "repo"
    source.mkdir()
    return source, repo


def add_source_version(source: Path, name: str, onnx_file: Path, version: int) -> ModelVersion:
    """What a CI pipeline drops into the source folder (the repository layout)."""
    return write_version(
        source, dataclasses.replace(identity_config(), name=name), onnx_file, version=version
    )


def settings_for(url: str, source: Path, repo: Path, **overrides: Any) -> SidecarSettings:
    return SidecarSettings(
        nats_url=url, source=source, repository=repo, **{"answer_wait_s": 0.5, "poll_s": 0.1, **overrides}
    )


async def test_a_new_version_is_published_and_every_answer_collected(
    nats_server: Any, folders: tuple[Path, Path], onnx_file: Path, unique: str
) -> None:
    source, repo = folders
    name = f"ident-{unique}"
    written = add_source_version(source, name, onnx_file, 3)
    nc = await nats.connect(nats_server.url)
    signals: list[dict[str, Any]] = []

    def worker(worker_name: str, status: str) -> Any:
        async def answer(msg: Any) -> None:
            signals.append(json.loads(msg.data))
            body = {"worker": worker_name, "model": name, "status": status, "version": 3, "message": "ok"}
            await msg.respond(json.dumps(body).encode())

        return answer

    async def garbage(msg: Any) -> None:
        await msg.respond(b"not json")

    await nc.subscribe(reload_subject(name), cb=worker("w1", "loaded"))
    await nc.subscribe(reload_subject(name), cb=worker("w2", "unchanged"))
    await nc.subscribe(reload_subject(name), cb=garbage)
    await nc.flush()
    out = io.StringIO()
    try:
        async with Sidecar(settings_for(nats_server.url, source, repo), out=out) as sidecar:
            first = await sidecar.poll()
            assert first.waiting == [(name, 3)]
            assert not first.published
            assert not (repo / name / "3").exists()
            second = await sidecar.poll()
            third = await sidecar.poll()
    finally:
        await nc.drain()
    assert [(p.model, p.version) for p in second.published] == [(name, 3)]
    assert signals == [{"model": name, "version": 3}] * 2
    assert sorted(second.answers[name], key=lambda a: a.worker) == [
        WorkerAnswer("w1", name, "loaded", 3, "ok"),
        WorkerAnswer("w2", name, "unchanged", 3, "ok"),
    ]
    assert not third.published
    assert not third.waiting
    copied = ModelRepository(repo).load_version(name, 3)
    assert copied.manifest.sha256 == written.manifest.sha256
    assert copied.manifest.created == written.manifest.created
    assert [p.name for p in (repo / name).iterdir() if p.name.startswith(".")] == []
    printed = out.getvalue()
    assert f"published {name} v3" in printed
    assert "worker w1 loaded v3" in printed
    assert "worker w2 unchanged v3" in printed


async def test_a_half_copied_version_is_taken_only_when_complete(
    nats_server: Any,
    folders: tuple[Path, Path],
    onnx_file: Path,
    unique: str,
) -> None:
    source, repo = folders
    name = f"half-{unique}"
    written = add_source_version(source, name, onnx_file, 1)
    full = written.model_file.read_bytes()
    written.model_file.write_bytes(full[: len(full) // 2])  # manifest present, model file half copied
    out = io.StringIO()
    async with Sidecar(settings_for(nats_server.url, source, repo, answer_wait_s=0.1), out=out) as sidecar:
        assert (await sidecar.poll()).waiting == [(name, 1)]
        stalled = await sidecar.poll()
        assert [(r.model, r.version) for r in stalled.refused] == [(name, 1)]
        assert "checksum mismatch" in stalled.refused[0].reason
        assert f"sidecar: refused {name} v1: " in out.getvalue()
        assert not (await sidecar.poll()).refused  # refused once per state of the files, not on every scan
        assert ModelRepository(repo).versions(name) == []
        written.model_file.write_bytes(full)  # the copy resumes and completes
        assert (await sidecar.poll()).waiting == [(name, 1)]
        done = await sidecar.poll()
    assert [(p.model, p.version) for p in done.published] == [(name, 1)]
    assert ModelRepository(repo).load_version(name, 1).manifest.sha256 == written.manifest.sha256


async def test_a_version_without_manifest_is_refused_and_never_copied(
    nats_server: Any, folders: tuple[Path, Path], onnx_file: Path, unique: str
) -> None:
    source, repo = folders
    name = f"nomani-{unique}"
    add_source_version(source, name, onnx_file, 2)
    (source / name / "2" / "manifest.json").unlink()
    (source / "Not A Model").mkdir()
    (source / name / "latest").mkdir()
    async with Sidecar(settings_for(nats_server.url, source, repo), out=io.StringIO()) as sidecar:
        await sidecar.poll()
        result = await sidecar.poll()
    assert [(r.model, r.version) for r in result.refused] == [(name, 2)]
    assert "manifest.json: missing" in result.refused[0].reason
    assert not (repo / name / "2").exists()
    assert not result.published


async def test_versions_older_than_the_repository_are_not_taken_and_keep_prunes(
    nats_server: Any, folders: tuple[Path, Path], onnx_file: Path, unique: str
) -> None:
    source, repo = folders
    name = f"old-{unique}"
    write_version(repo, dataclasses.replace(identity_config(), name=name), onnx_file, version=5)
    for number in (4, 6, 7):
        add_source_version(source, name, onnx_file, number)
    settings = settings_for(nats_server.url, source, repo, answer_wait_s=0.1, keep_versions=2)
    async with Sidecar(settings, out=io.StringIO()) as sidecar:
        await sidecar.poll()
        result = await sidecar.poll()
    assert [p.version for p in result.published] == [6, 7]
    assert ModelRepository(repo).versions(name) == [6, 7]


def test_sidecar_cli_once(
    nats_server: Any,
    folders: tuple[Path, Path],
    onnx_file: Path,
    unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, repo = folders
    name = f"once-{unique}"
    add_source_version(source, name, onnx_file, 1)
    parser = argparse.ArgumentParser(prog="jetinfer")
    builder_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "sidecar",
            "--source",
            str(source),
            "--repository",
            str(repo),
            "--nats-url",
            nats_server.url,
            "--poll-s",
            "0.1",
            "--answer-wait-s",
            "0.2",
            "--once",
        ]
    )
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert f"published {name} v1" in out
    assert "no worker answered" in out
    assert ModelRepository(repo).load_version(name, 1).version == 1


def test_sidecar_stops_cleanly_on_sigterm(nats_server: Any, folders: tuple[Path, Path]) -> None:
    source, repo = folders
    command = [
        sys.executable,
        "-m",
        "jetinfer.cli",
        "sidecar",
        "--source",
        str(source),
        "--repository",
        str(repo),
        "--nats-url",
        nats_server.url,
        "--poll-s",
        "0.2",
    ]
    with subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JETINFER_LOG_LEVEL": "INFO"},
    ) as process:
        try:
            assert process.stderr is not None
            seen = []
            for line in process.stderr:
                seen.append(line)
                if "sidecar: watching" in line:
                    break
            assert any("sidecar: watching" in line for line in seen), "".join(seen)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_settings_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as missing:
        SidecarSettings(repository=tmp_path)
    assert missing.value.setting == "source"
    with pytest.raises(SettingsError) as same:
        SidecarSettings(source=tmp_path, repository=tmp_path)
    assert same.value.setting == "repository"
    with pytest.raises(SettingsError) as poll:
        SidecarSettings(source=tmp_path, repository=tmp_path / "r", poll_s=0)
    assert poll.value.setting == "poll_s"
