"""Preprocess: how image requests become model inputs, one strategy per model server chosen at start.

`CpuDecoding` (the CPU threads), `GpuNormalise` (CPU threads to pixels, normalised on the GPU),
`GpuDecode` (JPEGs decoded on the GPU) and `ProcessDecoding` (decoding processes into shared memory,
normalised on the GPU) implement `Preprocessing`; `choose_preprocessing` picks one from the settings.
"""

from .base import CpuDecoding, Preprocessing
from .choice import choose_preprocessing
from .gpu import GpuDecode, GpuNormalise, GpuPreprocessing, GpuTools, ProcessDecoding

__all__ = [
    "CpuDecoding",
    "GpuDecode",
    "GpuNormalise",
    "GpuPreprocessing",
    "GpuTools",
    "Preprocessing",
    "ProcessDecoding",
    "choose_preprocessing",
]
