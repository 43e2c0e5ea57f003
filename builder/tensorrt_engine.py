"""Build a TensorRT engine (model.plan) from an ONNX model, for the GPU it runs on.

`build_engine` parses the ONNX file (every parser error is listed when it fails), adds one
optimisation profile giving every input a dynamic batch of min..opt..max frames, sets FP16 and INT8
(INT8 calibrated by an entropy calibrator fed with a folder of images through the model's own
preprocessing), limits the builder's workspace, reuses a timing cache file across builds, and
writes the serialised engine atomically. It returns what the version's manifest records under
``"tensorrt"`` so that the worker can refuse the plan on another TensorRT release or GPU.

Invalid arguments raise `SettingsError` naming the argument; anything TensorRT, the ONNX file or the
calibration images make impossible raises `ModelLoadError` saying why. Neither TensorRT nor
cuda-python is imported before `build_engine` needs them, so this module imports anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from jetinfer.errors import ModelLoadError, RequestError, SettingsError
from jetinfer.images import image_pixels, normalise, preprocess_image
from jetinfer.protocol import DATATYPES
from jetinfer.repository import ModelConfig, PreprocessConfig, TensorSpec
from jetinfer.tensorrt_log import tensorrt_logger, tensorrt_said

if TYPE_CHECKING:
    # tensorrt-stubs installs its .pyi files without a py.typed marker, hence the unused-ignore.
    import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

__all__ = [
    "CALIBRATION_BATCH",
    "IMAGE_SUFFIXES",
    "build_engine",
    "calibration_batches",
    "calibration_files",
    "calibration_tensor",
]

logger = logging.getLogger(__name__)

#: File name endings of calibration images.
IMAGE_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"})
#: Frames per calibration batch (fewer when max_batch or the image count is smaller).
CALIBRATION_BATCH: Final = 8

# TensorRT DataType name -> wire datatype.
_TRT_DATATYPES: Final = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}


# -- calibration images ---------------------------------------------------------------------------


def calibration_tensor(image: Image.Image, preprocess: PreprocessConfig) -> npt.NDArray[Any]:
    """One opened image as the model sees it (no batch dimension): the worker's own crop, resize and
    normalisation (`jetinfer.images`)."""
    return normalise(image_pixels(image, preprocess), preprocess)


def calibration_files(folder: Path) -> list[Path]:
    """The image files in `folder` (by suffix, sorted); `ModelLoadError` if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: calibration folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ModelLoadError(f"{folder}: no calibration images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def calibration_batches(
    folder: Path, preprocess: PreprocessConfig, batch_size: int
) -> Iterator[npt.NDArray[Any]]:
    """Batches of `batch_size` preprocessed images from `folder`; an incomplete last batch is dropped.

    Raises `ModelLoadError` for a folder with fewer than `batch_size` images or an unreadable image.
    """
    files = calibration_files(folder)
    if len(files) < batch_size:
        raise ModelLoadError(f"{folder}: {len(files)} calibration images, a batch needs {batch_size}")
    for start in range(0, len(files) - batch_size + 1, batch_size):
        frames = []
        for path in files[start : start + batch_size]:
            try:
                # Decoded from its bytes, as a request would be (JPEGs at reduced DCT scale too).
                frames.append(preprocess_image(path.read_bytes(), preprocess)[0])
            except (RequestError, OSError) as exc:
                raise ModelLoadError(f"{path}: cannot read calibration image: {exc}") from exc
        yield np.stack(frames)


# -- TensorRT and CUDA plumbing -------------------------------------------------------------------


def _import_tensorrt() -> None:
    try:
        import tensorrt  # type: ignore[import-untyped, unused-ignore]
    except ImportError as exc:
        raise ModelLoadError(f"TensorRT is not installed; building a model.plan needs it: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"TensorRT cannot be imported: {type(exc).__name__}: {exc}") from exc
    if not hasattr(tensorrt, "Builder") or not hasattr(tensorrt, "__version__"):
        raise ModelLoadError(
            "TensorRT is not installed (only type stubs are present); building a model.plan needs it"
        )


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise ModelLoadError("cuda-python is not installed; pip install 'jetinfer[gpu]'") from exc
    return runtime


def _cuda(result: Any, what: str) -> Any:
    """Check a cuda-python result tuple; return its value (or None)."""
    status = result[0] if isinstance(result, tuple) else result
    if int(status) != 0:
        raise ModelLoadError(f"{what} failed: {getattr(status, 'name', status)}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


def _compute_capability() -> str:
    rt = _cudart()
    device = _cuda(rt.cudaGetDevice(), "cudaGetDevice")
    attr = rt.cudaDeviceAttr
    major = _cuda(
        rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute"
    )
    minor = _cuda(
        rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute"
    )
    return f"{int(major)}.{int(minor)}"


def _make_calibrator(
    batches: Iterator[npt.NDArray[Any]], batch_size: int, nbytes: int, dtype: np.dtype[Any]
) -> tuple[trt.IInt8EntropyCalibrator2, Callable[[], None]]:
    """An entropy calibrator over `batches`, and a function that frees its device buffer."""
    import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

    rt = _cudart()
    device_ptr = int(_cuda(rt.cudaMalloc(nbytes), "cudaMalloc (calibration buffer)"))

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches_fed = 0

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int]:
            batch = next(batches, None)
            if batch is None:
                return []
            host = np.ascontiguousarray(batch, dtype=dtype)
            kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            _cuda(
                rt.cudaMemcpy(device_ptr, host.ctypes.data, host.nbytes, kind),
                "cudaMemcpy (calibration batch)",
            )
            self.batches_fed += 1
            return [device_ptr]

        def read_calibration_cache(self) -> bytes | None:  # type: ignore[override, unused-ignore]
            return None  # always calibrate: a cache would silently outlive a change of images or model

        def write_calibration_cache(self, cache: Any) -> None:
            logger.debug("tensorrt: calibration table of %d bytes not kept", len(memoryview(cache)))

    def free() -> None:
        result = rt.cudaFree(device_ptr)
        if int(result[0]) != 0:
            logger.error(
                "tensorrt: freeing the calibration buffer failed: %s", getattr(result[0], "name", result[0])
            )

    return _Calibrator(), free


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# -- the build ------------------------------------------------------------------------------------


def _check_arguments(
    onnx_file: Path,
    config: ModelConfig,
    *,
    int8: bool,
    calibration_dir: Path | None,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    workspace_bytes: int,
) -> None:
    if min_batch < 1:
        raise SettingsError("min_batch", f"{min_batch} must be at least 1")
    if not min_batch <= opt_batch <= max_batch:
        raise SettingsError(
            "opt_batch",
            f"need min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}",
        )
    if max_batch < config.max_batch:
        raise SettingsError(
            "max_batch",
            f"{max_batch} is below the model config's max_batch {config.max_batch}: "
            "the engine could not run the batches the worker sends",
        )
    if min_batch > 1:
        logger.warning("tensorrt: min_batch %d: the worker pads smaller batches up to it", min_batch)
    if workspace_bytes < 1:
        raise SettingsError("workspace_bytes", f"{workspace_bytes} must be positive")
    if int8:
        if calibration_dir is None:
            raise SettingsError("calibration_dir", "INT8 needs a folder of calibration images")
        if config.preprocess is None:
            raise SettingsError(
                "calibration_dir",
                f"model {config.name!r} has no preprocess section to prepare calibration images with",
            )
        if len(config.inputs) != 1:
            raise SettingsError(
                "int8",
                f"INT8 calibration feeds one image input; {config.name!r} has {len(config.inputs)} inputs",
            )
        calibration_files(calibration_dir)
    if not Path(onnx_file).is_file():
        raise ModelLoadError(f"{onnx_file}: no such ONNX file")


def _profile_shape(name: str, onnx_shape: tuple[int, ...], spec: TensorSpec, where: Path) -> tuple[int, ...]:
    """The input's shape without the batch, with dynamic ONNX dimensions taken from the config."""
    if len(onnx_shape) != len(spec.shape) + 1:
        raise ModelLoadError(
            f"{where}: input {name!r} has shape {list(onnx_shape)} in the ONNX model, the config "
            f"says [batch, {', '.join(map(str, spec.shape))}]"
        )
    if onnx_shape[0] != -1:
        raise ModelLoadError(
            f"{where}: input {name!r} has a fixed batch dimension ({onnx_shape[0]}); export the "
            "ONNX model with a dynamic batch axis"
        )
    dims = []
    for axis, (onnx_dim, config_dim) in enumerate(zip(onnx_shape[1:], spec.shape, strict=True), start=1):
        if onnx_dim != -1 and config_dim != -1 and onnx_dim != config_dim:
            raise ModelLoadError(
                f"{where}: input {name!r} dimension {axis} is {onnx_dim} in the ONNX model, "
                f"{config_dim} in the config"
            )
        size = onnx_dim if onnx_dim != -1 else config_dim
        if size == -1:
            raise ModelLoadError(
                f"{where}: input {name!r} dimension {axis} is dynamic in the ONNX model and "
                "in the config; fix it in the config to build an engine"
            )
        dims.append(size)
    return tuple(dims)


def build_engine(
    onnx_file: Path,
    out_file: Path,
    *,
    config: ModelConfig,
    fp16: bool,
    int8: bool,
    calibration_dir: Path | None,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    workspace_bytes: int,
    timing_cache: Path | None,
) -> dict[str, str]:
    """Build `onnx_file` into a serialised engine at `out_file` (written atomically).

    Every input gets a dynamic batch of min_batch..max_batch (tuned for opt_batch) with its other
    dimensions from the ONNX model or, where dynamic there, the config. `timing_cache` is read if it
    exists and written back after the build. Returns ``{"version": TensorRT version,
    "compute_capability": "9.0"}`` for the version's manifest.
    """
    onnx_file, out_file = Path(onnx_file), Path(out_file)
    _check_arguments(
        onnx_file,
        config,
        int8=int8,
        calibration_dir=calibration_dir,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_bytes=workspace_bytes,
    )
    _import_tensorrt()
    import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

    compute_capability = _compute_capability()
    tensorrt_said()  # forget what an earlier step said
    builder = trt.Builder(tensorrt_logger())
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, tensorrt_logger())
    if not parser.parse_from_file(str(onnx_file)):
        problems = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            node = f"node {error.node()} ({error.node_name() or '?'}, {error.node_operator() or '?'})"
            problems.append(f"  - {error.code()} at {node}: {error.desc()}")
        raise ModelLoadError(
            f"{onnx_file}: TensorRT's ONNX parser found {len(problems)} error(s):\n" + "\n".join(problems)
        )

    specs = {spec.name: spec for spec in config.inputs}
    network_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = sorted(t.name for t in network_inputs)
    if names != sorted(specs):
        raise ModelLoadError(f"{onnx_file}: ONNX inputs {names} differ from the config's {sorted(specs)}")
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    missing = [spec.name for spec in config.outputs if spec.name not in outputs]
    if missing:
        raise ModelLoadError(
            f"{onnx_file}: the config's outputs {missing} are not ONNX outputs {sorted(outputs)}"
        )
    frame_shapes: dict[str, tuple[int, ...]] = {}
    for tensor in network_inputs:
        spec = specs[tensor.name]
        datatype = _TRT_DATATYPES.get(tensor.dtype.name, tensor.dtype.name)
        if datatype != spec.datatype:
            raise ModelLoadError(
                f"{onnx_file}: input {tensor.name!r} is {datatype} in the ONNX model, "
                f"{spec.datatype} in the config"
            )
        frame_shapes[tensor.name] = _profile_shape(tensor.name, _dims(tensor.shape), spec, onnx_file)

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, frame in frame_shapes.items():
        profile.set_shape(
            name, trt.Dims([min_batch, *frame]), trt.Dims([opt_batch, *frame]), trt.Dims([max_batch, *frame])
        )
    builder_config.add_optimization_profile(profile)
    cache = _load_timing_cache(builder_config, timing_cache)
    calibration = None
    try:
        with warnings.catch_warnings():
            # The FP16/INT8 builder flags (deprecated in TensorRT 10.12 for strongly typed networks) and
            # implicit INT8 calibration (deprecated in 10.1 for Q/DQ models) are what build a plain FP32
            # ONNX export into reduced precision, so they are used deliberately.
            warnings.simplefilter("ignore", DeprecationWarning)
            if fp16:
                if not builder.platform_has_fast_fp16:
                    logger.warning("tensorrt: this GPU has no fast FP16; building with FP16 anyway")
                builder_config.set_flag(trt.BuilderFlag.FP16)
            if int8:
                assert calibration_dir is not None  # _check_arguments
                calibration = _set_up_int8(
                    builder, builder_config, config, frame_shapes, calibration_dir, max_batch
                )
            serialized = builder.build_serialized_network(network, builder_config)
    finally:
        if calibration is not None:
            calibration[1]()  # the calibrator itself stays referenced until here, as TensorRT uses it
    if serialized is None:
        raise ModelLoadError(f"{onnx_file}: TensorRT could not build the engine{tensorrt_said()}")
    _write_atomically(out_file, memoryview(serialized))
    if timing_cache is not None:
        _write_atomically(timing_cache, memoryview(cache.serialize()))
    info = {"version": str(trt.__version__), "compute_capability": compute_capability}
    logger.info(
        "tensorrt: built %s from %s (%s, batch %d..%d..%d, %s%s)",
        out_file,
        onnx_file,
        info,
        min_batch,
        opt_batch,
        max_batch,
        "fp16" if fp16 else "fp32",
        "+int8" if int8 else "",
    )
    return info


def _load_timing_cache(builder_config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    """The timing cache from `path` if it exists and suits this TensorRT and GPU, else a fresh one."""
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = builder_config.create_timing_cache(data)
    if cache is not None and builder_config.set_timing_cache(cache, False):
        if data:
            logger.info("tensorrt: reusing timing cache %s (%d bytes)", path, len(data))
        return cache
    logger.warning("tensorrt: timing cache %s does not suit this TensorRT or GPU; starting a fresh one", path)
    cache = builder_config.create_timing_cache(b"")
    builder_config.set_timing_cache(cache, False)
    return cache


def _set_up_int8(
    builder: trt.Builder,
    builder_config: trt.IBuilderConfig,
    config: ModelConfig,
    frame_shapes: dict[str, tuple[int, ...]],
    calibration_dir: Path,
    max_batch: int,
) -> tuple[trt.IInt8EntropyCalibrator2, Callable[[], None]]:
    """Set the INT8 flag, a calibration profile and an entropy calibrator; return it and its cleanup."""
    import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

    assert config.preprocess is not None
    ((name, frame),) = frame_shapes.items()
    spec = config.input_spec(name)
    batch_size = min(CALIBRATION_BATCH, max_batch, len(calibration_files(calibration_dir)))
    expected = (spec.datatype, frame)
    sample = next(calibration_batches(calibration_dir, config.preprocess, 1))
    if (config.preprocess.datatype, tuple(sample.shape[1:])) != expected:
        raise ModelLoadError(
            f"{calibration_dir}: preprocessing gives {config.preprocess.datatype} "
            f"{list(sample.shape[1:])}, input {name!r} takes {spec.datatype} {list(frame)}"
        )
    dtype = DATATYPES[spec.datatype]
    nbytes = batch_size * math.prod(frame) * dtype.itemsize
    calibrator, free = _make_calibrator(
        calibration_batches(calibration_dir, config.preprocess, batch_size), batch_size, nbytes, dtype
    )
    calibration_profile = builder.create_optimization_profile()
    shape = trt.Dims([batch_size, *frame])
    calibration_profile.set_shape(name, shape, shape, shape)
    builder_config.set_flag(trt.BuilderFlag.INT8)
    builder_config.int8_calibrator = calibrator
    if not builder_config.set_calibration_profile(calibration_profile):
        free()
        raise ModelLoadError(
            f"TensorRT refused the calibration profile {list(_dims(shape))}{tensorrt_said()}"
        )
    logger.info("tensorrt: INT8 calibration with %s, batches of %d", calibration_dir, batch_size)
    return calibrator, free
