"""Every option of every command is a flag and a JETINFER_* variable, with its default in --help; bare
`jetinfer` lists the commands; a typo shows the subcommand's usage and the close flag (issue 16.8)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest

from jetinfer.cli import build_parser
from tests.conftest import NatsUnderTest, run_cli, running_worker


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


COMMANDS = sorted(_subcommands())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_a_flag_and_a_variable_with_its_default(command: str) -> None:
    parser = _subcommands()[command]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        variable = "JETINFER_" + action.dest.upper()
        flag = action.option_strings[0]
        assert f"env {variable}" in (action.help or ""), f"{command} {flag}: no variable in its help"
        assert "default: " in (action.help or ""), f"{command} {flag}: no default in its help"
        assert "default: None" not in (action.help or ""), f"{command} {flag} shows Python's None"


def test_the_options_the_issue_named_show_their_variables() -> None:
    for command, option in (
        ("infer", "--top-k"),
        ("video", "--every-n"),
        ("video", "--in-flight"),
        ("bench", "--duration-s"),
        ("engine-bench", "--duration-s"),
        ("build", "--max-batch"),
    ):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())  # argparse wraps lines
        variable = "JETINFER_" + option.removeprefix("--").replace("-", "_").upper()
        assert f"{option} " in text
        assert f"env {variable}; default: " in text, (command, option)


def test_top_level_help_shows_a_real_default_for_the_log_level() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: None)" not in text
    assert "default: INFO" in text
    assert "JETINFER_LOG_LEVEL" in text


def test_bare_jetinfer_lists_the_commands_and_exits_2() -> None:
    result = run_cli()
    assert result.returncode == 2
    for command in COMMANDS:
        assert command in result.stderr
    assert "usage: jetinfer" in result.stderr


def test_a_typo_shows_the_subcommands_usage_and_the_close_flag() -> None:
    result = run_cli("serve", "--modle", "identity")
    assert result.returncode == 2
    assert "usage: jetinfer serve" in result.stderr
    assert "--modle" in result.stderr
    assert "did you mean --model?" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_log_level_variable_is_one_line() -> None:
    result = run_cli("models", "--repository", "/nonexistent", env={"JETINFER_LOG_LEVEL": "loud"})
    assert result.returncode == 2
    assert "JETINFER_LOG_LEVEL" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_lower_case_log_level_works(tmp_path: Path) -> None:
    result = run_cli("models", "--repository", str(tmp_path), env={"JETINFER_LOG_LEVEL": "debug"})
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 1)


def test_top_k_from_the_environment(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes, tmp_path: Path
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(cat_jpeg)

    async def run() -> Any:
        async with running_worker(nats_server.url, repo, [model]):
            return await asyncio.to_thread(
                run_cli,
                "infer",
                "--nats-url",
                nats_server.url,
                model,
                str(photo),
                env={"JETINFER_TOP_K": "2"},
            )

    result = asyncio.run(run())
    assert result.returncode == 0, result.stderr
    labels = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(labels) == 2, result.stdout


def test_settings_errors_of_the_producer_commands_name_flag_and_variable(tmp_path: Path) -> None:
    result = run_cli(
        "video", str(tmp_path), "--model", "m", "--out", str(tmp_path / "o.jsonl"), "--every-n", "0"
    )
    assert result.returncode == 2
    assert "--every-n" in result.stderr
    assert "JETINFER_EVERY_N" in result.stderr
    missing = run_cli("video", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), env={"JETINFER_MODEL": ""})
    assert missing.returncode == 2
    assert "--model" in missing.stderr
    assert "JETINFER_MODEL" in missing.stderr


def test_bench_takes_its_nats_url_from_the_settings(tmp_path: Path) -> None:
    result = run_cli(
        "bench",
        "--model",
        "identity",
        "--duration-s",
        "0",
        env={"JETINFER_NATS_URL": "http://wrong"},
    )
    assert result.returncode == 2
    assert "JETINFER_DURATION_S" in result.stderr or "JETINFER_NATS_URL" in result.stderr
    assert "Traceback" not in result.stderr
