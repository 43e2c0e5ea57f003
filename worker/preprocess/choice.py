"""Choosing a model server's preprocessing strategy, once, at start, from the settings."""

from __future__ import annotations

from jetinfer.repository import ModelConfig

from ..settings import WorkerSettings
from .base import CpuDecoding, Preprocessing
from .gpu import GpuDecode, GpuNormalise, GpuTools, ProcessDecoding

__all__ = ["choose_preprocessing"]


def choose_preprocessing(
    settings: WorkerSettings, config: ModelConfig, max_frames: int, tools: GpuTools | None = None
) -> Preprocessing:
    """The strategy for a model whose serving version has `config`.

    Tensor models, and image models without GPU preprocessing asked for, decode on the CPU threads.
    Blocking (it may start processes and CUDA): call it from a thread. Raises ModelLoadError where the
    GPU tools cannot work here (no CUDA, no torchvision), so the worker refuses the setting at start.
    """
    tools = tools or GpuTools()
    preprocess = config.preprocess
    if preprocess is None or not (settings.gpu_decode or settings.gpu_normalise):
        return CpuDecoding()
    gpu_decode = (
        GpuDecode(
            preprocess,
            device=settings.device,
            max_frames=max_frames,
            nvimgcodec=settings.nvimgcodec,
            normalise_others=settings.gpu_normalise,
            tools=tools,
        )
        if settings.gpu_decode
        else None
    )
    if settings.decode_processes:
        return ProcessDecoding(
            preprocess,
            device=settings.device,
            max_frames=max_frames,
            processes=settings.decode_processes,
            small_batches_on_gpu=gpu_decode,
            tools=tools,
        )
    if gpu_decode is not None:
        return gpu_decode
    return GpuNormalise(preprocess, device=settings.device, max_frames=max_frames, tools=tools)
