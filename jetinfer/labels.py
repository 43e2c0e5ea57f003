"""Class labels and top-k results for classifier outputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Prediction", "imagenet_labels", "top_k"]


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class labels in class-index order (281-285 are cats)."""
    text = (Path(__file__).parent / "data" / "imagenet_labels.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k result."""

    index: int
    label: str
    score: float


def top_k(logits: npt.NDArray[Any], labels: Sequence[str] = (), k: int = 5) -> list[Prediction]:
    """Top `k` classes of one frame's logits, with softmax scores."""
    values = np.asarray(logits, dtype=np.float64).reshape(-1)
    shifted = np.exp(values - values.max())
    scores = shifted / shifted.sum()
    order = np.argsort(-scores)[:k]
    return [
        Prediction(int(i), labels[i] if i < len(labels) else f"class {int(i)}", float(scores[i]))
        for i in order
    ]
