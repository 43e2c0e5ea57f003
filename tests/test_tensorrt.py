"""TensorRT: engine builds and the model.plan backend, plus the pieces that run without TensorRT.

Tests marked `trt` build and serve real engines; they run where TensorRT and a CUDA device are
present (the GPU Docker image) and skip elsewhere, saying why. The rest run everywhere: the
manifest/GPU compatibility rules, the calibration images' preprocessing, the checked CUDA wrapper,
and that nothing imports TensorRT before it is needed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from jetinfer.builder.tensorrt_engine import (
    build_engine,
    calibration_batches,
    calibration_files,
    calibration_tensor,
)
from jetinfer.errors import BackendError, ModelLoadError, SettingsError
from jetinfer.images import preprocess_image
from jetinfer.repository import ModelConfig, ModelVersion, PreprocessConfig, TensorSpec, write_version
from jetinfer.worker.backends import cuda
from jetinfer.worker.backends.base import load_backend
from jetinfer.worker.backends.tensorrt import check_compatibility, import_tensorrt, same_release

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tensorrt_missing() -> str:
    """Why TensorRT tests cannot run here ('' when they can)."""
    try:
        import_tensorrt()
    except ModelLoadError as exc:
        return f"TensorRT is not importable here: {exc}"
    try:
        if cuda.device_count() < 1:
            return "no CUDA device"
    except (ModelLoadError, cuda.CudaError) as exc:
        return f"no CUDA device: {exc}"
    return ""


def _cuda_missing() -> str:
    try:
        if cuda.device_count() < 1:
            return "no CUDA device"
    except (ModelLoadError, cuda.CudaError) as exc:
        return f"no CUDA device: {exc}"
    return ""


TRT_MISSING = _tensorrt_missing()
needs_trt = pytest.mark.skipif(bool(TRT_MISSING), reason=TRT_MISSING or "TensorRT present")
CUDA_MISSING = _cuda_missing()
needs_cuda = pytest.mark.skipif(bool(CUDA_MISSING), reason=CUDA_MISSING or "CUDA present")

MAX_BATCH = 8

#: The build arguments most tests use; each test overrides what it is about.
BUILD_DEFAULTS: dict[str, Any] = {
    "fp16": False,
    "int8": False,
    "calibration_dir": None,
    "min_batch": 1,
    "opt_batch": 4,
    "max_batch": MAX_BATCH,
    "workspace_bytes": 1 << 28,
    "timing_cache": None,
}


def build(onnx_file: Path, plan: Path, config: ModelConfig, **overrides: Any) -> dict[str, str]:
    """`build_engine` with BUILD_DEFAULTS, `overrides` winning."""
    return build_engine(onnx_file, plan, config=config, **{**BUILD_DEFAULTS, **overrides})


def gemm_config(max_batch: int = MAX_BATCH) -> ModelConfig:
    return ModelConfig(
        name="gemm",
        max_batch=max_batch,
        inputs=(TensorSpec("x", "FP32", (4,)),),
        outputs=(TensorSpec("y", "FP32", (3,)),),
    )


def fake_plan_version(tmp_path: Path, engine_info: dict[str, str]) -> ModelVersion:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00not an engine")
    return write_version(tmp_path / "repo", gemm_config(), plan, backend="tensorrt", tensorrt=engine_info)


# -- manifest / GPU compatibility (pure logic) -----------------------------------------------------


def test_same_release_ignores_the_build_number() -> None:
    assert same_release("10.13.0.35", "10.13.0.36")
    assert same_release("10.13.0", "10.13.0.35")
    assert not same_release("10.13.0.35", "10.13.2.6")
    assert not same_release("10.12.0.36", "10.13.0.35")
    with pytest.raises(ModelLoadError, match=r"major\.minor\.patch"):
        same_release("ten", "10.13.0")


def test_a_matching_plan_passes() -> None:
    check_compatibility(
        {"version": "10.13.0.35", "compute_capability": "9.0"},
        tensorrt_version="10.13.0.35",
        compute_capability="9.0",
        where="m/1",
    )


def test_another_tensorrt_release_is_refused_naming_both() -> None:
    with pytest.raises(
        ModelLoadError, match=r"built with TensorRT 10\.12\.0\.36 .* runs TensorRT 10\.13\.0\.35"
    ):
        check_compatibility(
            {"version": "10.12.0.36", "compute_capability": "9.0"},
            tensorrt_version="10.13.0.35",
            compute_capability="9.0",
            where="m/1",
        )


def test_another_gpu_architecture_is_refused_naming_both() -> None:
    with pytest.raises(ModelLoadError, match=r"compute capability 8\.6 but this GPU is 9\.0"):
        check_compatibility(
            {"version": "10.13.0.35", "compute_capability": "8.6"},
            tensorrt_version="10.13.0.35",
            compute_capability="9.0",
            where="m/1",
        )


@pytest.mark.parametrize("info", [{}, {"version": "10.13.0.35"}, {"compute_capability": "9.0"}])
def test_a_manifest_without_engine_info_is_refused(info: dict[str, str]) -> None:
    with pytest.raises(ModelLoadError, match="rebuild it with `jetinfer build --backend tensorrt`"):
        check_compatibility(info, tensorrt_version="10.13.0.35", compute_capability="9.0", where="m/1")


# -- without TensorRT: imports, refusals -----------------------------------------------------------


def test_modules_import_without_tensorrt_or_cuda_python() -> None:
    code = (
        "import sys\n"
        "sys.modules['tensorrt'] = None\n"  # makes `import tensorrt` raise ImportError
        "sys.modules['cuda'] = None\n"
        "sys.modules['torch'] = None\n"
        "import worker.backends.tensorrt, worker.backends.torch, worker.backends.cuda\n"
        "import builder.tensorrt_engine, builder.torch_export\n"
        "print('imported')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


def test_import_tensorrt_refuses_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ModelLoadError, match="TensorRT is not installed"):
        import_tensorrt()


def test_import_tensorrt_refuses_the_stubs_namespace_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # What tensorrt-stubs leaves behind: `import tensorrt` works but the module is empty.
    monkeypatch.setitem(
        sys.modules,
        "tensorrt",
        importlib.util.module_from_spec(importlib.machinery.ModuleSpec("tensorrt", None)),
    )
    with pytest.raises(ModelLoadError, match="only type stubs"):
        import_tensorrt()


def test_loading_a_plan_without_tensorrt_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    version = fake_plan_version(tmp_path, {"version": "10.13.0.35", "compute_capability": "9.0"})
    with pytest.raises(ModelLoadError, match="TensorRT is not installed"):
        load_backend(version)


def test_building_without_tensorrt_is_a_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="TensorRT is not installed"):
        build(onnx_file, tmp_path / "model.plan", gemm_config())
    assert not (tmp_path / "model.plan").exists()


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"min_batch": 0}, "min_batch"),
        ({"min_batch": 4, "opt_batch": 2}, "opt_batch"),
        ({"opt_batch": 16}, "opt_batch"),
        ({"max_batch": 4, "opt_batch": 4}, "max_batch"),
        ({"workspace_bytes": 0}, "workspace_bytes"),
        ({"int8": True}, "calibration_dir"),
    ],
)
def test_build_arguments_are_checked_first(tmp_path: Path, overrides: dict[str, Any], setting: str) -> None:
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(SettingsError) as raised:
        build(onnx_file, tmp_path / "model.plan", gemm_config(), **overrides)
    assert raised.value.setting == setting


def test_int8_needs_images_and_a_preprocess_section(tmp_path: Path) -> None:
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    common: dict[str, Any] = {"int8": True, "max_batch": 8}
    with pytest.raises(SettingsError, match="no preprocess section"):
        build(onnx_file, tmp_path / "p", gemm_config(), calibration_dir=tmp_path, **common)
    with pytest.raises(ModelLoadError, match="no calibration images"):
        build(onnx_file, tmp_path / "p", image_config(), calibration_dir=tmp_path / "empty", **common)


def test_a_missing_onnx_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such ONNX file"):
        build(tmp_path / "absent.onnx", tmp_path / "model.plan", gemm_config())


# -- calibration images: the model's own preprocessing ------------------------------------------------


def image_config(layout: str = "NCHW", datatype: str = "FP32", center_crop: float = 1.0) -> ModelConfig:
    preprocess = PreprocessConfig(
        input="images",
        width=8,
        height=6,
        mean=(120.0, 110.0, 100.0),
        std=(60.0, 50.0, 40.0),
        layout=layout,  # type: ignore[arg-type]
        datatype=datatype,
        center_crop=center_crop,
    )
    shape = (3, 6, 8) if layout == "NCHW" else (6, 8, 3)
    return ModelConfig(
        name="convnet",
        max_batch=MAX_BATCH,
        inputs=(TensorSpec("images", datatype, shape),),
        outputs=(TensorSpec("scores", "FP32", (4,)),),
        preprocess=preprocess,
    )


def photo(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_calibration_tensor_of_a_flat_colour_is_exact() -> None:
    config = image_config()
    assert config.preprocess is not None
    flat = Image.new("RGB", (20, 10), (180, 160, 140))
    tensor = calibration_tensor(flat, config.preprocess)
    assert tensor.shape == (3, 6, 8)
    assert tensor.dtype == np.float32
    np.testing.assert_allclose(
        tensor[:, 0, 0], [(180 - 120) / 60, (160 - 110) / 50, (140 - 100) / 40], rtol=1e-6
    )
    assert np.all(tensor == tensor[:, :1, :1])


@pytest.mark.parametrize(
    ("layout", "datatype", "center_crop"),
    [("NCHW", "FP32", 1.0), ("NHWC", "FP32", 0.75), ("NCHW", "FP16", 0.875), ("NHWC", "UINT8", 1.0)],
)
def test_calibration_tensor_matches_the_worker(layout: str, datatype: str, center_crop: float) -> None:
    config = image_config(layout, datatype, center_crop)
    assert config.preprocess is not None
    image = photo(seed=7)
    served = preprocess_image(png_bytes(image), config.preprocess)[0]
    calibrated = calibration_tensor(image, config.preprocess)
    assert calibrated.shape == served.shape
    assert calibrated.dtype == served.dtype
    np.testing.assert_allclose(calibrated.astype(np.float64), served.astype(np.float64), rtol=1e-3, atol=1e-5)


def test_calibration_batches_drop_the_incomplete_tail(tmp_path: Path) -> None:
    config = image_config()
    assert config.preprocess is not None
    images = [photo(seed) for seed in range(5)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in calibration_files(tmp_path)] == [f"img{i}.png" for i in range(5)]
    batches = list(calibration_batches(tmp_path, config.preprocess, 2))
    assert [b.shape for b in batches] == [(2, 3, 6, 8), (2, 3, 6, 8)]
    np.testing.assert_array_equal(batches[1][0], calibration_tensor(images[2], config.preprocess))


def test_calibration_errors_name_the_folder_or_file(tmp_path: Path) -> None:
    config = image_config()
    assert config.preprocess is not None
    with pytest.raises(ModelLoadError, match="does not exist"):
        list(calibration_batches(tmp_path / "absent", config.preprocess, 1))
    photo(1).save(tmp_path / "good.png")
    with pytest.raises(ModelLoadError, match="1 calibration images, a batch needs 2"):
        list(calibration_batches(tmp_path, config.preprocess, 2))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ModelLoadError, match=r"broken\.png: cannot read calibration image"):
        list(calibration_batches(tmp_path, config.preprocess, 1))


# -- the checked CUDA wrapper ---------------------------------------------------------------------------


def test_check_returns_the_values_of_a_success() -> None:
    rt = cuda.runtime()
    ok = rt.cudaError_t.cudaSuccess
    assert cuda.check((ok,)) is None
    assert cuda.check((ok, 5)) == 5
    assert cuda.check((ok, 5, 6)) == (5, 6)


def test_check_names_the_cuda_error() -> None:
    rt = cuda.runtime()
    with pytest.raises(
        cuda.CudaError, match=r"cudaMalloc failed: cudaErrorMemoryAllocation \(out of memory\)"
    ) as raised:
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    assert isinstance(raised.value, BackendError)
    assert raised.value.error_name == "cudaErrorMemoryAllocation"


def test_a_failing_runtime_call_raises_naming_the_function() -> None:
    rt = cuda.runtime()
    with pytest.raises(cuda.CudaError) as raised:  # no such device here, or no driver at all
        cuda.cuda_call(rt.cudaSetDevice, 1_000_000)
    assert raised.value.function == "cudaSetDevice"
    assert raised.value.error_name.startswith("cudaError")


def test_gpu_options_are_settings_with_flags_and_variables() -> None:
    from jetinfer.settings import load_settings
    from jetinfer.worker.settings import WorkerSettings

    assert load_settings(WorkerSettings, environ={}).backend_options().cuda_graphs is True
    off = load_settings(WorkerSettings, environ={"JETINFER_CUDA_GRAPHS": "off", "JETINFER_TORCH_FP16": "no"})
    assert (off.backend_options().cuda_graphs, off.backend_options().fp16) == (False, False)
    with pytest.raises(SettingsError, match="cuda_graphs"):
        load_settings(WorkerSettings, environ={"JETINFER_CUDA_GRAPHS": "sometimes"})


@pytest.mark.gpu
@needs_cuda
def test_pinned_round_trip_through_the_device_and_a_graph() -> None:
    cuda.set_device(0)
    data = np.arange(1024, dtype=np.float32)
    src, dst = cuda.HostBuffer(data.nbytes), cuda.HostBuffer(data.nbytes)
    device = cuda.DeviceBuffer(data.nbytes)
    stream = cuda.Stream()
    graph = None
    try:
        src.view(np.float32, data.shape)[:] = data
        stream.copy_to_device(device.ptr, src.ptr, data.nbytes)
        stream.copy_to_host(dst.ptr, device.ptr, data.nbytes)
        stream.synchronize()
        np.testing.assert_array_equal(dst.view(np.float32, data.shape), data)
        # The same copies captured into a graph, then launched with new data in the source buffer.

        def copies() -> None:
            stream.copy_to_device(device.ptr, src.ptr, data.nbytes)
            stream.copy_to_host(dst.ptr, device.ptr, data.nbytes)

        graph = stream.capture(copies)
        src.view(np.float32, data.shape)[:] = data * 2
        graph.launch(stream)
        stream.synchronize()
        np.testing.assert_array_equal(dst.view(np.float32, data.shape), data * 2)
    finally:
        cuda.close_all([b for b in (graph, stream, device, src, dst) if b is not None])
    for resource in (stream, device, src, dst):
        resource.close()  # twice is safe
    with pytest.raises(BackendError, match="closed"):
        src.view(np.float32, data.shape)


# -- real engines (TensorRT and a CUDA device) ------------------------------------------------------------


def write_gemm_onnx(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """y = relu(x @ w + b) with a dynamic batch; returns (w, b)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["z"]), helper.make_node("Relu", ["z"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w, b


def build_gemm(
    tmp_path: Path, *, fp16: bool = False, timing_cache: Path | None = None
) -> tuple[ModelVersion, Any]:
    onnx_file = tmp_path / "gemm.onnx"
    w, b = write_gemm_onnx(onnx_file)
    plan = tmp_path / "build" / "model.plan"
    info = build(onnx_file, plan, gemm_config(), fp16=fp16, timing_cache=timing_cache)
    version = write_version(
        tmp_path / "repo",
        gemm_config(),
        plan,
        backend="tensorrt",
        precision="fp16" if fp16 else "fp32",
        tensorrt=info,
    )

    def expected(x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ w + b, 0.0)

    return version, expected


@pytest.mark.trt
@needs_trt
def test_engine_outputs_match_numpy(tmp_path: Path) -> None:
    version, expected = build_gemm(tmp_path)
    assert version.manifest.tensorrt["compute_capability"] == cuda.compute_capability(0)
    with load_backend(version) as backend:
        for batch in (1, 3, MAX_BATCH, 3):
            x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
            out = backend.infer({"x": x})
            assert out["y"].shape == (batch, 3)
            np.testing.assert_allclose(out["y"], expected(x), rtol=1e-5, atol=1e-5)
        assert getattr(backend, "graph_count", 0) == 3  # one CUDA graph per batch size seen


@pytest.mark.trt
@needs_trt
def test_fp16_engine_with_a_timing_cache(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    version, expected = build_gemm(tmp_path, fp16=True, timing_cache=cache)
    assert cache.stat().st_size > 0
    build_gemm(tmp_path / "again", fp16=True, timing_cache=cache)  # reads it back
    with load_backend(version) as backend:
        x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
        np.testing.assert_allclose(backend.infer({"x": x})["y"], expected(x), rtol=1e-2, atol=1e-2)


@pytest.mark.trt
@needs_trt
def test_plan_from_another_tensorrt_is_refused(tmp_path: Path) -> None:
    version, _ = build_gemm(tmp_path)
    plan = version.model_file
    other = write_version(
        tmp_path / "repo2",
        gemm_config(),
        plan,
        backend="tensorrt",
        tensorrt={**version.manifest.tensorrt, "version": "9.0.1.4"},
    )
    with pytest.raises(ModelLoadError, match=r"built with TensorRT 9\.0\.1\.4"):
        load_backend(other)


@pytest.mark.trt
@needs_trt
def test_parser_errors_are_listed(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not protobuf")
    with pytest.raises(ModelLoadError, match="ONNX parser found"):
        build(broken, tmp_path / "model.plan", gemm_config())


@pytest.mark.trt
@needs_trt
def test_int8_calibrated_conv_engine_runs(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    config = image_config()
    rng = np.random.default_rng(3)
    kernel = (rng.standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "k"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["p"]),
            helper.make_node("Flatten", ["p"], ["scores"]),
        ],
        "conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 6, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(kernel, "k")],
    )
    onnx_file = tmp_path / "conv.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(onnx_file)
    )
    images = tmp_path / "calibration"
    images.mkdir()
    for seed in range(16):
        photo(seed).save(images / f"{seed}.png")
    plan = tmp_path / "model.plan"
    info = build(onnx_file, plan, config, fp16=True, int8=True, calibration_dir=images)
    version = write_version(
        tmp_path / "repo", config, plan, backend="tensorrt", precision="int8", tensorrt=info
    )
    assert config.preprocess is not None
    x = next(calibration_batches(images, config.preprocess, 4))
    with load_backend(version) as backend:
        out = backend.infer({"images": x})["scores"]
    assert out.shape == (4, 4)
    assert np.all(np.isfinite(out))
