"""The JavaScript client of docs/protocol.md, as printed there, keeps the client's duties (issue 15).

It runs under Node against a real worker: through a nats-server restart in the middle of 2,000
requests every request is answered (re-sent after the reconnect under `<id>~r<n>`, replies
deduplicated by id), and as a tenant against the shipped deploy/nats/accounts.conf. Node and the
client's npm packages come from `make install` (its node-deps step); without them the tests skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from jetinfer.embedded import EmbeddedNatsServer
from jetinfer.settings import StreamSettings
from tests.conftest import REPO_ROOT, running_worker
from tests.test_faults import register_on, take_and_ack_without_reply
from tests.test_protocol_doc import fenced_blocks

NODE_MODULES = REPO_ROOT / ".node-deps" / "node_modules"
BOUND_S = 120.0  # the longest any run below may take, passed or failed


@pytest.fixture
def client_program(tmp_path: Path) -> Path:
    """client.mjs from docs/protocol.md in a folder of its own, next to the installed npm packages."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript client of docs/protocol.md needs Node 20")
    if not (NODE_MODULES / "nats" / "package.json").is_file():
        pytest.skip(f"{NODE_MODULES} lacks nats: run `make install` (its node-deps step needs npm)")
    folder = tmp_path / "js"
    folder.mkdir()
    (folder / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    program = folder / "client.mjs"
    program.write_text(fenced_blocks("js")["client.mjs"], encoding="utf-8")
    return program


async def run_client(
    program: Path, env: dict[str, str], args: list[str], *, on_line: Any = None
) -> tuple[int, dict[str, Any]]:
    """Run the program; call `on_line(line)` for each progress line; its exit code and final counts."""
    process = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node",
        str(program),
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[str] = []
    try:
        async with asyncio.timeout(BOUND_S):
            assert process.stdout is not None
            async for raw in process.stdout:
                line = raw.decode().strip()
                lines.append(line)
                if on_line is not None:
                    await on_line(line)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    errors = (await process.stderr.read()).decode()
    assert lines, f"the client printed nothing; stderr:\n{errors}"
    return process.returncode or 0, json.loads(lines[-1])


async def test_every_request_is_answered_across_a_server_restart(
    client_program: Path, own_nats: EmbeddedNatsServer, model_repo: Any
) -> None:
    repo, model = model_repo("identity")
    restarted = asyncio.Event()

    async def restart_once(line: str) -> None:
        # Requests are in flight all the time (64 lanes): the restart loses the replies on their way.
        if line == "answered 300" and not restarted.is_set():
            restarted.set()
            await asyncio.to_thread(own_nats.restart)

    async with running_worker(own_nats.url, repo, [model]):
        code, counts = await run_client(
            client_program, {"NATS_URL": own_nats.url}, [model, "2000", "64"], on_line=restart_once
        )
    assert restarted.is_set()
    assert counts["answered"] == 2000, counts
    assert counts["mismatches"] == 0
    assert counts["errors"] == {}
    assert counts["reconnects"] >= 1
    assert counts["resent"] >= 1  # what an independent client without the duty lost (64 of 2,000)
    assert code == 0


async def test_a_request_acknowledged_without_its_reply_is_asked_for_again(
    client_program: Path, own_nats: EmbeddedNatsServer, model_repo: Any
) -> None:
    """The ack landed, the reply did not (a server between worker and client died): the ack floor says."""
    repo, model = model_repo("identity")
    await register_on(own_nats.url, model, StreamSettings())
    node = asyncio.create_task(run_client(client_program, {"NATS_URL": own_nats.url}, [model, "1", "1"]))
    try:
        await take_and_ack_without_reply(own_nats.url, model)
        async with running_worker(own_nats.url, repo, [model]):
            code, counts = await node
    finally:
        node.cancel()
    assert (counts["answered"], counts["lostReplies"], counts["resent"]) == (1, 1, 1), counts
    assert code == 0


async def test_the_client_works_as_a_tenant_against_the_shipped_accounts_file(
    client_program: Path, model_repo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_tenancy import ACCOUNTS, PASSWORDS, WORKER_INBOX

    for user, password in PASSWORDS.items():
        monkeypatch.setenv(f"JETINFER_{user.upper()}_PASSWORD", password)
    repo, model = model_repo("identity")
    with EmbeddedNatsServer(extra_config=ACCOUNTS.read_text()) as server:
        async with running_worker(
            server.url,
            repo,
            [model],
            nats_user="worker",
            nats_password=PASSWORDS["worker"],
            nats_inbox_prefix=WORKER_INBOX,
        ):
            env = {
                "NATS_URL": server.url,
                "NATS_USER": "producer_a",
                "NATS_PASSWORD": PASSWORDS["producer_a"],
                "JETINFER_TENANT": "producer_a",
            }
            code, counts = await run_client(client_program, env, [model, "50", "8"])
        log = server.log_file.read_text(errors="replace")
    assert counts["answered"] == 50, counts
    assert counts["errors"] == {}
    assert code == 0
    assert "Violation" not in log  # it stayed inside what producer_a may do
