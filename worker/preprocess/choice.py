"""Choosing a model server's preprocessing strategy, once, at start, from its plan (settings and what the
worker found: see `jetinfer.worker.autoconfig`)."""

from __future__ import annotations

import logging

from jetinfer.errors import ModelLoadError
from jetinfer.repository import ModelConfig

from ..autoconfig import Plan
from ..settings import WorkerSettings
from .base import CpuDecoding, Preprocessing
from .gpu import GpuDecode, GpuNormalise, GpuPreprocessing, GpuTools, ProcessDecoding

__all__ = ["choose_preprocessing"]

logger = logging.getLogger(__name__)


def choose_preprocessing(
    plan: Plan, settings: WorkerSettings, config: ModelConfig, max_frames: int, tools: GpuTools | None = None
) -> Preprocessing:
    """The strategy for a model whose serving version has `config`, as `plan` says.

    Tensor models, and image models without GPU preprocessing, decode on the CPU threads. Blocking (it
    may start processes and CUDA): call it from a thread. Raises ModelLoadError where GPU tools that the
    settings ask for cannot work here (no CUDA, no torchvision), so the worker refuses them at start; GPU
    decoding the worker chose itself is dropped there instead, saying so.
    """
    strategy = _choose(plan, settings, config, max_frames, tools or GpuTools())
    if isinstance(strategy, GpuPreprocessing) and config.preprocess is not None:
        # The batches on the GPU at once: those made ahead, the one running, the one being made.
        strategy.reserve(config.preprocess, max_frames, plan.pipeline_depth + 2)
    return strategy


def _choose(
    plan: Plan, settings: WorkerSettings, config: ModelConfig, max_frames: int, tools: GpuTools
) -> Preprocessing:
    preprocess = config.preprocess
    if preprocess is None or not (plan.gpu_decode or plan.gpu_normalise):
        return CpuDecoding()
    common = {"device": settings.device, "max_frames": max_frames, "tools": tools, "lanes": plan.lanes}
    if plan.decode_processes:
        try:
            return ProcessDecoding(
                preprocess,
                processes=plan.decode_processes,
                small_batches_on_gpu=plan.gpu_decode,
                nvimgcodec=settings.nvimgcodec,
                gpu_lanes=plan.gpu_lanes,
                gpu_lanes_nvimgcodec=plan.hardware_lanes,
                **common,  # type: ignore[arg-type]
            )
        except ModelLoadError as exc:
            if not plan.gpu_decode or settings.gpu_decode is not None:
                raise
            logger.warning("small JPEG batches stay off the GPU: %s", exc)
            return ProcessDecoding(
                preprocess,
                processes=plan.decode_processes,
                small_batches_on_gpu=False,
                nvimgcodec=False,
                **common,  # type: ignore[arg-type]
            )
    if plan.gpu_decode:
        try:
            return GpuDecode(
                preprocess,
                nvimgcodec=settings.nvimgcodec,
                normalise_others=plan.gpu_normalise,
                **common,  # type: ignore[arg-type]
            )
        except ModelLoadError as exc:
            if settings.gpu_decode is not None or not plan.gpu_normalise:
                raise
            logger.warning("JPEGs are decoded on the CPU: %s", exc)
    return GpuNormalise(preprocess, **common)  # type: ignore[arg-type]
