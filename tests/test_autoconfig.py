"""Self-configuration: the cores a worker may use (affinity and cgroup quota), and what it chooses."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from jetinfer.repository import ModelConfig, PreprocessConfig, TensorSpec
from jetinfer.worker.autoconfig import (
    DECODE_EFFICIENCY,
    GPU_RESERVED_CORES,
    Rates,
    plan,
    probe_rates,
    usable_cores,
)
from jetinfer.worker.settings import WorkerSettings

TENSORS = ModelConfig(
    name="m",
    max_batch=8,
    inputs=(TensorSpec("input", "FP32", (4,)),),
    outputs=(TensorSpec("output", "FP32", (4,)),),
)
#: One process's decoding rate (measured alone) at which 8 processes decode about 7,200 img/s in the plan.
EIGHT_DECODE_7200 = 7_200.0 / (8 * DECODE_EFFICIENCY)

IMAGES = dataclasses.replace(
    TENSORS,
    inputs=(TensorSpec("input", "FP32", (3, 8, 8)),),
    preprocess=PreprocessConfig(input="input", width=8, height=8),
)


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_a_cgroup_v2_quota_below_the_affinity_caps_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores
    assert usable_cores(tmp_path) == (1, "cgroup CPU quota 1.5")


def test_a_cgroup_v1_quota_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == (1, "cgroup CPU quota 1")


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == (affinity(), "CPU affinity")
    assert usable_cores(tmp_path / "nowhere") == (affinity(), "CPU affinity")


def test_a_quota_above_the_affinity_does_not_raise_it(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text(f"{(affinity() + 8) * 100000} 100000\n")
    assert usable_cores(tmp_path)[0] == affinity()


def settings(**overrides: object) -> WorkerSettings:
    return WorkerSettings(model=["m"], metrics_port=0, **overrides)  # type: ignore[arg-type]


def test_an_image_model_on_a_gpu_gets_processes_lanes_and_a_short_gil_switch() -> None:
    chosen = plan(settings(), IMAGES, on_gpu=True, cores=16, cores_why="test")
    assert chosen.gpu_normalise
    assert chosen.decode_processes == 16 - GPU_RESERVED_CORES
    assert chosen.lanes == 2
    assert chosen.pipeline_depth == 2
    assert chosen.gil_switch_ms == 1.0
    assert "16 cores (test)" in chosen.describe()


def test_flags_win_over_choices() -> None:
    chosen = plan(
        settings(
            decode_processes=3, preprocess_lanes=1, pipeline_depth=4, gil_switch_ms=0.0, gpu_decode=False
        ),
        IMAGES,
        on_gpu=True,
        cores=16,
        cores_why="test",
    )
    assert (chosen.decode_processes, chosen.lanes, chosen.pipeline_depth, chosen.gil_switch_ms) == (
        3,
        1,
        4,
        0.0,
    )
    assert not chosen.gpu_decode


def test_gpu_decode_alone_keeps_its_meaning() -> None:
    chosen = plan(settings(gpu_decode=True), IMAGES, on_gpu=True, cores=16, cores_why="test")
    assert chosen.gpu_decode
    assert not chosen.gpu_normalise
    assert chosen.decode_processes == 0


@pytest.mark.parametrize(("model", "on_gpu"), [(IMAGES, False), (TENSORS, True), (TENSORS, False)])
def test_a_cpu_backend_or_a_tensor_model_decodes_on_threads_sized_to_the_cores(
    model: ModelConfig, on_gpu: bool
) -> None:
    chosen = plan(settings(), model, on_gpu=on_gpu, cores=3, cores_why="test")
    assert (chosen.gpu_decode, chosen.gpu_normalise, chosen.decode_processes) == (False, False, 0)
    assert chosen.decode_threads == 3
    assert chosen.pipeline_depth == 1
    assert chosen.gil_switch_ms == 0.0
    assert plan(settings(decode_workers=5), model, on_gpu=on_gpu, cores=3, cores_why="t").decode_threads == 5


@pytest.mark.parametrize(
    ("engine", "lanes", "processes"),
    [(5_000.0, 0, 8), (10_000.0, 1, 8), (14_000.0, 1, 8), (16_000.0, 2, 7), (30_000.0, 3, 6)],
)
def test_gpu_decode_lanes_are_added_where_the_processes_cannot_keep_up(
    engine: float, lanes: int, processes: int
) -> None:
    rates = Rates(engine=engine, decode_per_process=EIGHT_DECODE_7200)
    gpu = {"gpu_decode": True, "gpu_normalise": True}  # as where torchvision is installed
    chosen = plan(settings(**gpu), IMAGES, on_gpu=True, cores=10, cores_why="test", rates=rates)
    assert chosen.decode_processes == processes
    assert chosen.gpu_lanes == lanes
    assert chosen.pipeline_depth == 2 + lanes
    assert f"{lanes} lane(s) decoding JPEG batches on the GPU" in chosen.describe()
    assert (
        plan(
            settings(gpu_decode_lanes=0), IMAGES, on_gpu=True, cores=10, cores_why="t", rates=rates
        ).gpu_lanes
        == 0
    )


def test_the_rates_are_measured_on_the_engine_and_a_jpeg_of_the_models_size() -> None:
    class Engine:
        def __init__(self) -> None:
            self.batches: list[tuple[int, ...]] = []

        def infer(self, inputs: dict[str, Any]) -> dict[str, Any]:
            self.batches.append(inputs["input"].shape)
            return {}

    engine = Engine()
    rates = probe_rates(engine, IMAGES, 16, hardware=False)  # type: ignore[arg-type]
    assert engine.batches == [(16, 3, 8, 8)] * 3
    assert rates.engine > 0
    assert rates.decode_per_process > 0
    assert rates.hardware_decode is None


def test_nvjpeg_lanes_past_the_first_take_their_cores_from_the_processes_the_plan_chose() -> None:
    light = Rates(engine=30_000.0, decode_per_process=EIGHT_DECODE_7200)
    gpu = {"gpu_decode": True, "gpu_normalise": True}
    forced = plan(settings(gpu_decode_lanes=2, **gpu), IMAGES, on_gpu=True, cores=10, cores_why="t")
    assert (forced.gpu_lanes, forced.decode_processes) == (2, 7)
    assert "7 decoding processes (1 core(s) left to the GPU lanes)" in forced.describe()
    # Processes given on the command line stay as given.
    given = plan(
        settings(decode_processes=8, **gpu), IMAGES, on_gpu=True, cores=10, cores_why="t", rates=light
    )
    assert (given.gpu_lanes, given.decode_processes) == (3, 8)
    # Never below one process per process lane.
    small = plan(settings(**gpu), IMAGES, on_gpu=True, cores=4, cores_why="t", rates=light)
    assert (small.gpu_lanes, small.decode_processes, small.lanes) == (3, 2, 2)


@pytest.mark.parametrize(
    ("engine", "hardware", "lanes"),
    [(5_000.0, 20_000.0, 0), (10_000.0, 20_000.0, 1), (30_000.0, 20_000.0, 2), (10_000.0, 4_000.0, 2)],
)
def test_with_nvimgcodec_lanes_decode_on_the_jpeg_engine_where_one_was_found(
    engine: float, hardware: float, lanes: int
) -> None:
    rates = Rates(engine=engine, decode_per_process=EIGHT_DECODE_7200, hardware_decode=hardware)
    chosen = plan(settings(nvimgcodec=True), IMAGES, on_gpu=True, cores=10, cores_why="test", rates=rates)
    assert chosen.gpu_lanes == lanes
    assert chosen.hardware_lanes
    assert chosen.pipeline_depth == 2 + lanes
    assert f"the JPEG engine {hardware:,.0f}: {lanes} lane(s)" in chosen.describe()


def test_no_nvimgcodec_keeps_the_jpeg_engine_out_of_the_plan() -> None:
    rates = Rates(engine=30_000.0, decode_per_process=EIGHT_DECODE_7200, hardware_decode=20_000.0)
    gpu = {"gpu_decode": True, "gpu_normalise": True}
    chosen = plan(
        settings(nvimgcodec=False, **gpu), IMAGES, on_gpu=True, cores=10, cores_why="t", rates=rates
    )
    assert chosen.gpu_lanes == 3  # on the SMs (nvJPEG), as without a JPEG engine
    assert not chosen.hardware_lanes
    assert "JPEG engine" not in chosen.describe()


def test_without_a_gpu_there_is_no_jpeg_engine_to_time() -> None:
    pytest.importorskip("torch", reason="the hardware probe needs torch to find a GPU; without it: None")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: its JPEG engine may well be found")
    from jetinfer.worker.gpu_decode import hardware_jpeg_rate

    assert IMAGES.preprocess is not None
    assert hardware_jpeg_rate(IMAGES.preprocess, b"\xff\xd8", frames=4) is None
