"""The torch backend (model.pt2 from torch.export) on the CPU here, and on CUDA where there is one."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer.errors import BackendError, InvalidInputError, ModelLoadError, SettingsError, TooLargeError
from jetinfer.repository import ModelConfig, ModelVersion, TensorSpec, write_version
from jetinfer.worker import gc_tuning
from jetinfer.worker.backends.base import BackendOptions, load_backend

torch = pytest.importorskip("torch", reason="torch is not installed (the export extra)")

from jetinfer.builder.torch_export import export_pt2  # noqa: E402
from jetinfer.worker.backends.torch import TorchBackend, batch_buckets  # noqa: E402

MAX_BATCH = 8
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def tiny_net() -> Any:
    """A small conv net with seeded weights and non-trivial batch-norm statistics."""
    torch.manual_seed(1234)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def tiny_config(max_batch: int = MAX_BATCH) -> ModelConfig:
    return ModelConfig(
        name="tinynet",
        max_batch=max_batch,
        inputs=(TensorSpec("images", "FP32", (3, 16, 16)),),
        outputs=(TensorSpec("logits", "FP32", (5,)),),
    )


def publish(tmp_path: Path, net: Any, config: ModelConfig) -> ModelVersion:
    model_file = tmp_path / "export" / "model.pt2"
    export_pt2(net, model_file, config=config, max_batch=config.max_batch)
    return write_version(
        tmp_path / "repo", config, model_file, backend="torch", producer={"torch": torch.__version__}
    )


def load_program(path: Path) -> Any:
    with warnings.catch_warnings():  # torch 2.11's loader warns (once) about read-only bytes of its own
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.export.load(str(path))


def reference(net: Any, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        result: np.ndarray = net(torch.from_numpy(batch)).numpy()
    return result


def frames(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def net() -> Any:
    return tiny_net()


@pytest.fixture
def version(tmp_path: Path, net: Any) -> ModelVersion:
    return publish(tmp_path, net, tiny_config())


def test_buckets_are_powers_of_two_then_max_batch() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    with pytest.raises(ValueError, match="at least 1"):
        batch_buckets(0)


def test_a_large_batch_is_waited_for_asleep_and_a_small_one_by_spinning() -> None:
    """`wait_for`: CUDA's default wait spins on a core; past SPIN_UP_TO_FRAMES it is a blocking event."""
    from types import SimpleNamespace

    from jetinfer.worker.backends.torch_buckets import SPIN_UP_TO_FRAMES, wait_for

    calls: list[str] = []

    class Stream:
        def synchronize(self) -> None:
            calls.append("stream.synchronize")

    class Event:
        def __init__(self, blocking: bool = False) -> None:
            calls.append(f"Event(blocking={blocking})")

        def record(self, stream: Stream) -> None:
            calls.append("record")

        def synchronize(self) -> None:
            calls.append("event.synchronize")

    fake_torch = SimpleNamespace(cuda=SimpleNamespace(Event=Event))
    wait_for(fake_torch, Stream(), SPIN_UP_TO_FRAMES)
    assert calls == ["stream.synchronize"]
    calls.clear()
    wait_for(fake_torch, Stream(), SPIN_UP_TO_FRAMES + 1)
    assert calls == ["Event(blocking=True)", "record", "event.synchronize"]


def test_large_batches_are_staged_on_several_threads() -> None:
    from jetinfer.worker.backends.cuda import stage

    src = np.random.default_rng(0).standard_normal((37, 3, 112, 112)).astype(np.float32)  # 5.6 MB
    big = np.concatenate([src, src])  # over the 8 MiB threshold: copied in row chunks
    for source in (src, big):
        dst = np.zeros_like(source)
        stage(dst, source)
        np.testing.assert_array_equal(dst, source)


def test_staging_threads_end_at_shutdown_and_come_back_when_needed() -> None:
    """Idle staging threads must not look like an inference still running when the worker exits."""
    import threading
    import time

    from jetinfer.worker.backends.cuda import shutdown_staging, stage

    def staging_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("jetinfer-stage") and t.is_alive())

    big = np.ones((64, 3, 112, 112), np.float32)  # 9.6 MB: staged on threads
    dst = np.zeros_like(big)
    stage(dst, big)
    assert staging_threads() > 0
    shutdown_staging()
    deadline = time.monotonic() + 5
    while staging_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert staging_threads() == 0
    stage(dst, big * 2)
    np.testing.assert_array_equal(dst, big * 2)
    shutdown_staging()


def test_export_writes_the_file_atomically(tmp_path: Path, net: Any) -> None:
    out = tmp_path / "out" / "model.pt2"
    export_pt2(net, out, config=tiny_config(), max_batch=MAX_BATCH)
    assert out.stat().st_size > 0
    assert [p.name for p in out.parent.iterdir()] == ["model.pt2"]  # no temporary file left behind
    program = load_program(out)
    x = frames(3)
    np.testing.assert_allclose(
        program.module()(torch.from_numpy(x)).detach().numpy(), reference(net, x), rtol=1e-5, atol=1e-5
    )


def test_export_keeps_the_module_training_flag(tmp_path: Path) -> None:
    net = tiny_net().train()
    export_pt2(net, tmp_path / "model.pt2", config=tiny_config(), max_batch=MAX_BATCH)
    assert net.training


def test_export_refuses_a_max_batch_below_the_config(tmp_path: Path, net: Any) -> None:
    with pytest.raises(SettingsError, match="max_batch"):
        export_pt2(net, tmp_path / "model.pt2", config=tiny_config(), max_batch=MAX_BATCH - 1)
    assert not (tmp_path / "model.pt2").exists()


def test_export_of_a_module_that_cannot_take_the_inputs_is_a_load_error(tmp_path: Path) -> None:
    wrong = torch.nn.Linear(7, 2)  # takes (batch, 7), the config gives (batch, 3, 16, 16)
    with pytest.raises(ModelLoadError, match=r"torch\.export cannot export"):
        export_pt2(wrong, tmp_path / "model.pt2", config=tiny_config(), max_batch=MAX_BATCH)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(CUDA, reason="checks the CPU path; this machine has CUDA")
@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH])
def test_cpu_outputs_match_the_module(version: ModelVersion, net: Any, batch: int) -> None:
    with load_backend(version) as backend:
        assert isinstance(backend, TorchBackend)
        assert not backend.on_cuda
        assert not backend.fp16
        assert backend.graph_count == 0
        x = frames(batch, seed=batch)
        out = backend.infer({"images": x})
        assert list(out) == ["logits"]
        assert out["logits"].dtype == np.float32
        assert out["logits"].shape == (batch, 5)
        np.testing.assert_allclose(out["logits"], reference(net, x), rtol=1e-5, atol=1e-5)


def test_inputs_are_validated(version: ModelVersion) -> None:
    with load_backend(version) as backend:
        with pytest.raises(TooLargeError, match="max_batch"):
            backend.infer({"images": frames(MAX_BATCH + 1)})
        with pytest.raises(InvalidInputError, match="shape"):
            backend.infer({"images": np.zeros((2, 3, 16, 15), np.float32)})
        with pytest.raises(InvalidInputError, match="takes"):
            backend.infer({"pixels": frames(2)})
        with pytest.raises(InvalidInputError, match="complex64 given"):
            backend.infer({"images": np.zeros((2, 3, 16, 16), np.complex64)})
        with pytest.raises(InvalidInputError, match="empty batch"):
            backend.infer({"images": np.zeros((0, 3, 16, 16), np.float32)})


def test_read_only_and_fp64_inputs_are_served(version: ModelVersion, net: Any) -> None:
    x = frames(2)
    read_only = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(x.shape)  # like a decoded message
    assert not read_only.flags.writeable
    with load_backend(version) as backend:
        np.testing.assert_allclose(
            backend.infer({"images": read_only})["logits"], reference(net, x), rtol=1e-3, atol=1e-3
        )
        np.testing.assert_allclose(
            backend.infer({"images": x.astype(np.float64)})["logits"], reference(net, x), rtol=1e-3, atol=1e-3
        )


def test_close_is_safe_twice_and_infer_after_close_fails(version: ModelVersion) -> None:
    backend = load_backend(version)
    backend.warmup()
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer({"images": frames(1)})


def test_a_corrupt_file_is_a_load_error(tmp_path: Path) -> None:
    junk = tmp_path / "model.pt2"
    junk.write_bytes(b"not a torch.export archive")
    version = write_version(tmp_path / "repo", tiny_config(), junk, backend="torch")
    with pytest.raises(ModelLoadError, match="torch cannot load it"):
        load_backend(version)


def test_outputs_that_differ_from_the_config_are_refused_at_load(tmp_path: Path, net: Any) -> None:
    exported = tiny_config()
    version = publish(tmp_path, net, exported)
    wrong = ModelConfig(
        name="tinynet",
        max_batch=MAX_BATCH,
        inputs=exported.inputs,
        outputs=(TensorSpec("logits", "FP32", (7,)),),
    )
    misdescribed = ModelVersion(
        config=wrong, manifest=version.manifest, version=version.version, path=version.path
    )
    with pytest.raises(ModelLoadError, match="output 'logits' has shape"):
        load_backend(misdescribed)


def test_a_gpu_asked_for_without_cuda_is_a_load_error(version: ModelVersion) -> None:
    if CUDA:
        pytest.skip("checks the no-CUDA refusal; this machine has CUDA")
    with pytest.raises(ModelLoadError, match="sees no CUDA device"):
        load_backend(version, BackendOptions(device=0))


# -- CUDA (the H100): fp16, buckets, CUDA graphs, flat memory --------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 5, MAX_BATCH])
def test_cuda_fp16_graphs_match_the_module(version: ModelVersion, net: Any, batch: int) -> None:
    with load_backend(version, BackendOptions(device=0)) as backend:
        assert isinstance(backend, TorchBackend)
        assert backend.on_cuda
        assert backend.fp16
        assert backend.graph_count == len(batch_buckets(MAX_BATCH))
        x = frames(batch, seed=batch)
        out = backend.infer({"images": x})["logits"]
        assert out.dtype == np.float32
        assert out.shape == (batch, 5)
        expected = reference(net, x)
        np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2 * float(np.abs(expected).max()))


@pytest.mark.gpu
@needs_cuda
def test_cuda_batches_waited_for_asleep_match_the_module(tmp_path: Path, net: Any) -> None:
    """A batch past SPIN_UP_TO_FRAMES (a blocking event, not a spin) gives the same outputs."""
    from jetinfer.worker.backends.torch_buckets import SPIN_UP_TO_FRAMES

    large = 4 * SPIN_UP_TO_FRAMES
    with load_backend(publish(tmp_path, net, tiny_config(large)), BackendOptions(device=0)) as backend:
        x = frames(large, seed=3)
        out = backend.infer({"images": x})["logits"]
        expected = reference(net, x)
        np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2 * float(np.abs(expected).max()))


@pytest.mark.gpu
@needs_cuda
def test_cuda_without_graphs_or_fp16_matches_closely(version: ModelVersion, net: Any) -> None:
    backend = TorchBackend(version, BackendOptions(device=0, fp16=False, cuda_graphs=False))
    try:
        assert backend.graph_count == 0
        assert not backend.fp16
        x = frames(3)
        np.testing.assert_allclose(
            backend.infer({"images": x})["logits"], reference(net, x), rtol=1e-3, atol=1e-3
        )
    finally:
        backend.close()


@pytest.mark.gpu
@needs_cuda
def test_cuda_padding_does_not_leak_between_requests(version: ModelVersion, net: Any) -> None:
    with load_backend(version, BackendOptions(device=0)) as backend:
        big, small = frames(MAX_BATCH, seed=1), frames(3, seed=2)
        backend.infer({"images": big})  # leaves rows 3.. of the bucket-4 input holding other frames
        out = backend.infer({"images": small})["logits"]
        expected = reference(net, small)
        np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2 * float(np.abs(expected).max()))


@pytest.mark.gpu
@needs_cuda
def test_cuda_memory_is_flat_across_200_batches(version: ModelVersion) -> None:
    sizes = [1 + (i * 5) % MAX_BATCH for i in range(200)]
    with load_backend(version, BackendOptions(device=0)) as backend:
        backend.warmup()
        for size in sorted(set(sizes)):
            backend.infer({"images": frames(size)})
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(0)
        for i, size in enumerate(sizes):
            out = backend.infer({"images": frames(size, seed=i)})
            assert out["logits"].shape == (size, 5)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(0) == before


@pytest.mark.gpu
@needs_cuda
def test_cuda_memory_is_flat_across_reloads(version: ModelVersion) -> None:
    def cycle() -> None:
        backend = load_backend(version, BackendOptions(device=0))
        assert torch.cuda.memory_allocated(0) > baseline
        backend.infer({"images": frames(3)})
        backend.close()
        backend.close()

    baseline = 0
    cycle()  # the first load also creates what torch keeps per process (the stream's cuBLAS workspace)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(0)
    for _ in range(3):
        cycle()
        assert torch.cuda.memory_allocated(0) == baseline


@pytest.mark.gpu
@needs_cuda
def test_a_version_loaded_before_the_heap_was_frozen_still_leaves_the_gpu(version: ModelVersion) -> None:
    """`jetinfer serve` freezes the start-up heap, the loaded version in it; a frozen cycle is never
    collected, so the backend's close must unfreeze before it collects (worker/gc_tuning.py)."""
    load_backend(version, BackendOptions(device=0)).close()  # what torch keeps per process, made once
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(0)
    backend = load_backend(version, BackendOptions(device=0))
    backend.infer({"images": frames(3)})
    try:
        assert gc_tuning.freeze_startup_heap() > 0
        assert torch.cuda.memory_allocated(0) > baseline
        backend.close()
        assert torch.cuda.memory_allocated(0) == baseline
    finally:
        gc_tuning.collect_everything()
