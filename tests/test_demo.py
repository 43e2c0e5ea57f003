"""`jetinfer demo` (what `make demo` runs) classifies the cat and leaves no process behind."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import run_cli


def _nats_server_pids() -> set[int]:
    result = subprocess.run(
        ["pgrep", "-f", "nats-server -c .*jetinfer-nats-"], capture_output=True, text=True, check=False
    )
    return {int(pid) for pid in result.stdout.split()}


def test_demo_prints_a_cat_and_cleans_up(demo_repository: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(demo_repository / "efficientnet_lite0", cache / "efficientnet_lite0")
    before = _nats_server_pids()
    result = run_cli("demo", "--cache-dir", str(cache), "--requests", "32", env={"TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    chelsea = result.stdout.split("chelsea.jpg", 1)[1].split(".jpg", 1)[0].lower()
    assert "cat" in chelsea, result.stdout
    assert "throughput:" in result.stdout
    assert "images/s" in result.stdout
    assert _nats_server_pids() <= before, "the demo left a nats-server running"
