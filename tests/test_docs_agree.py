"""The docs say what the code does, and the commands' lines read the way they are meant (issue 16.10)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from jetinfer import demo_models
from jetinfer.builder.demo_models import write_identity_onnx
from jetinfer.repository import ModelRepository, write_version
from tests.conftest import REPO_ROOT, NatsUnderTest, run_cli


def progress_bar_in(text: str) -> bool:
    """Whether a tqdm bar was drawn (text mode turns its carriage returns into line breaks)."""
    return bool(re.search(r"\d+%\|", text))


DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def test_every_page_the_docs_cite_is_in_the_repository() -> None:
    shipped = {p.name for p in REPO_ROOT.rglob("*.md") if ".venv" not in p.parts}
    for doc in DOCS:
        text = re.sub(r"https?://\S+", "", doc.read_text())  # pages of other projects
        cited = set(re.findall(r"\b([A-Za-z0-9_-]+\.md)\b", text))
        assert cited <= shipped, f"{doc.name} cites {sorted(cited - shipped)}, which the repository lacks"


def test_deployment_comments_cite_no_page_outside_the_repository() -> None:
    shipped = {p.name for p in REPO_ROOT.rglob("*.md") if ".venv" not in p.parts}
    for manifest in (REPO_ROOT / "deploy").rglob("*.yaml"):
        cited = set(re.findall(r"\b([A-Za-z0-9_-]+\.md)\b", manifest.read_text()))
        assert cited <= shipped, f"{manifest} cites {sorted(cited - shipped)}"


def _in_progress_fraction(text: str) -> str:
    sentence = re.search(r"`in_progress`[^.]*?(half|a third) of\s+`ack_wait`", text, re.DOTALL)
    assert sentence is not None, "no sentence says when in_progress is sent"
    return sentence.group(1)


def test_protocol_and_operations_agree_on_when_in_progress_is_sent() -> None:
    """The worker sends in_progress once a third of ack_wait has passed (worker/settle.py)."""
    protocol = (REPO_ROOT / "docs" / "protocol.md").read_text()
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    assert _in_progress_fraction(protocol) == _in_progress_fraction(operations) == "a third"


def test_max_wait_ms_in_the_docs_is_what_the_base_deployment_runs() -> None:
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    stated = re.search(r"`max_wait_ms` stays (\d+)", operations)
    assert stated is not None
    deployment = yaml.safe_load((REPO_ROOT / "deploy/base/worker/worker-deployment.yaml").read_text())
    (worker,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    env = {e["name"]: e.get("value") for e in worker.get("env", [])}
    assert float(env.get("JETINFER_MAX_WAIT_MS", "0")) == float(stated.group(1))


def test_an_empty_demo_cache_says_not_exported_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exported: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess[str]:
        exported.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(demo_models.subprocess, "run", fake_run)
    demo_models.ensure_demo_model(tmp_path / "cache")
    out = capsys.readouterr()
    assert len(exported) == 1
    assert "not usable" not in out.out + out.err
    assert "missing" not in out.out + out.err
    assert "not exported yet" in out.out + out.err


def test_a_broken_demo_cache_still_says_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        demo_models.subprocess, "run", lambda command, check: subprocess.CompletedProcess(command, 0)
    )
    folder = tmp_path / "cache" / demo_models.DEMO_MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    demo_models.ensure_demo_model(tmp_path / "cache")
    out = capsys.readouterr()
    assert "not usable" in out.out + out.err
    assert "not valid JSON" in out.out + out.err


def test_export_demo_says_what_it_wrote_once(tmp_path: Path) -> None:
    result = run_cli("export-demo", "--repository", str(tmp_path / "repo"), "--models", "identity")
    assert result.returncode == 0, result.stderr
    assert "written: wrote" not in result.stdout
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("identity: ")][-1:]
    assert "v1" in line
    assert str(tmp_path / "repo" / "identity" / "1") in line
    assert not progress_bar_in(result.stderr + result.stdout)


def test_the_sidecar_says_each_event_once(nats_server: NatsUnderTest, tmp_path: Path) -> None:
    source, repository = tmp_path / "incoming", tmp_path / "repository"
    config = write_identity_onnx(tmp_path / "identity.onnx")
    write_version(source, config, tmp_path / "identity.onnx")
    result = run_cli(
        "sidecar",
        "--source",
        str(source),
        "--repository",
        str(repository),
        "--nats-url",
        nats_server.url,
        "--once",
        "--poll-s",
        "0.2",
        "--answer-wait-s",
        "0.2",
    )
    assert result.returncode == 0, result.stderr
    said = (result.stdout + result.stderr).splitlines()
    assert len([line for line in said if "published identity v1" in line]) == 1, said
    assert len([line for line in said if "no worker answered" in line]) == 1, said
    assert ModelRepository(repository).versions("identity") == [1]


def test_the_demo_writes_no_progress_bar_into_a_pipe(demo_repository: Path, tmp_path: Path) -> Any:
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(demo_repository / "efficientnet_lite0", cache / "efficientnet_lite0")
    result = run_cli("demo", "--cache-dir", str(cache), "--requests", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not progress_bar_in(result.stderr)
