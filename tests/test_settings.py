"""Settings come from flags, then JETINFER_* variables, then defaults; errors name the setting."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from jetinfer.errors import SettingsError
from jetinfer.settings import ConnectionSettings, add_arguments, load_settings
from jetinfer.worker.settings import WorkerSettings


def parse(cls: type, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return parser.parse_args(argv)


def test_flag_beats_environment_beats_default() -> None:
    env = {"JETINFER_MAX_BATCH": "16", "JETINFER_MAX_WAIT_MS": "7.5", "JETINFER_MODEL": "a,b"}
    settings = load_settings(WorkerSettings, parse(WorkerSettings, ["--max-batch", "8"]), environ=env)
    assert settings.max_batch == 8
    assert settings.max_wait_ms == 7.5
    assert settings.model == ["a", "b"]
    assert settings.pipeline_depth == WorkerSettings.__dataclass_fields__["pipeline_depth"].default


def test_repeated_and_comma_separated_list_flags() -> None:
    args = parse(WorkerSettings, ["--model", "a", "--model", "b,c", "--nak-delays-ms", "10,20"])
    settings = load_settings(WorkerSettings, args, environ={})
    assert settings.model == ["a", "b", "c"]
    assert settings.nak_delays_ms == [10, 20]


def test_booleans_paths_and_optional_values_from_environment(tmp_path: Path) -> None:
    settings = load_settings(
        WorkerSettings, environ={"JETINFER_REPOSITORY": str(tmp_path), "JETINFER_DEVICE": "1"}
    )
    assert settings.repository == tmp_path
    assert settings.device == 1


@pytest.mark.parametrize(
    ("environ", "setting"),
    [
        ({"JETINFER_MAX_BATCH": "lots"}, "max_batch"),
        ({"JETINFER_MAX_BATCH": "-1"}, "max_batch"),
        ({"JETINFER_PIPELINE_DEPTH": "0"}, "pipeline_depth"),
        ({"JETINFER_NATS_URL": "http://localhost:4222"}, "nats_url"),
        ({"JETINFER_MODEL": "../etc"}, "model"),
        ({"JETINFER_ACK_WAIT_S": "0.1"}, "ack_wait_s"),
        ({"JETINFER_METRICS_PORT": "70000"}, "metrics_port"),
        ({"JETINFER_NATS_USER": "alice"}, "nats_password"),
        ({"JETINFER_NATS_CREDS_FILE": "/nonexistent/user.creds"}, "nats_creds_file"),
        ({"JETINFER_GRACE_PERIOD_S": "0"}, "grace_period_s"),
        ({"JETINFER_NAK_DELAYS_MS": "-5"}, "nak_delays_ms"),
        ({"JETINFER_PARALLEL_BATCHES": "17"}, "parallel_batches"),
        ({"JETINFER_PARALLEL_BATCHES": "2", "JETINFER_GPU_DECODE": "1"}, "parallel_batches"),
        ({"JETINFER_DECODE_PROCESSES": "4", "JETINFER_GPU_NORMALISE": "0"}, "decode_processes"),
        ({"JETINFER_DECODE_PROCESSES": "-1"}, "decode_processes"),
        ({"JETINFER_PREPROCESS_LANES": "9"}, "preprocess_lanes"),
        ({"JETINFER_EVENT_LOOP": "trio"}, "event_loop"),
        ({"JETINFER_GIL_SWITCH_MS": "0.01"}, "gil_switch_ms"),
        ({"JETINFER_GC_THRESHOLD": "5"}, "gc_threshold"),
    ],
)
def test_invalid_values_name_the_setting(environ: dict[str, str], setting: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(WorkerSettings, environ=environ)
    assert caught.value.setting == setting
    assert f"--{setting.replace('_', '-')}" in str(caught.value)
    assert f"JETINFER_{setting.upper()}" in str(caught.value)


def test_two_auth_methods_are_refused(tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("not checked here")
    with pytest.raises(SettingsError, match="choose one"):
        ConnectionSettings(nats_token="t", nats_creds_file=creds)


def test_help_lists_every_setting_with_its_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, WorkerSettings)
    text = parser.format_help()
    for name in WorkerSettings.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text
        assert f"JETINFER_{name.upper()}" in " ".join(text.split())
