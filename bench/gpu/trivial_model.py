"""A trivial image model (strided conv, mean, linear) as a user's torch.export program and its config.json,
for the light-engine figure: the engine is then far faster than any path in front of it.

    python bench/gpu/trivial_model.py OUTDIR    # writes OUTDIR/trivial.pt2 and OUTDIR/config.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

MAX_BATCH = 256
CONFIG = {
    "max_batch": MAX_BATCH,
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 224, 224]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
    "preprocess": {
        "input": "input",
        "width": 224,
        "height": 224,
        "layout": "NCHW",
        "datatype": "FP32",
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
    },
}


class Trivial(torch.nn.Module):  # type: ignore[misc]
    """A 16x16-strided convolution, a mean and a linear layer: microseconds a batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 16, stride=16)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, pixels: Any) -> Any:
        return self.head(self.conv(pixels).mean(dim=(2, 3)))


def main(out: Path) -> None:
    """Export the model with a dynamic batch of 1..MAX_BATCH; write its config beside it."""
    out.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(
        Trivial().eval(), (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(out / "trivial.pt2"))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    print(f"wrote {out / 'trivial.pt2'} and {out / 'config.json'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
