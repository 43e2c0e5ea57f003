"""Where a pipeline's stages spend their time: seconds per (stage, activity), one Prometheus counter.

`rate(jetinfer_stage_seconds_total[1m])` of an activity is the share of the time its stage spent on it
(per run task, where a CPU model runs several batches at once). The run stage's shares say what the
engine waits for:

| stage | activity | the time spent |
| --- | --- | --- |
| form | `waiting_for_requests` | in the intake, for requests to arrive |
| form | `forming` | preparing requests and forming batches (decoding, where it is on the CPU threads) |
| form | `waiting_for_room` | for room in the queue of batches: the run stage is behind |
| run | `waiting_for_batch` | for a batch to be formed: nothing queued |
| run | `waiting_for_making` | for one of the queued batches to be made ahead (decoded, normalised) |
| run | `running` | running it (making it here first, where it was not made ahead) |
| run | `waiting_to_settle` | for room in the queue of answered batches: the settle stage is behind |
| settle | `waiting_for_batch` | for a batch to answer |
| settle | `settling` | publishing replies and acknowledging |

A busy worker whose run stage is mostly `running` is as fast as its engine; one mostly
`waiting_for_making` is held up by decoding; mostly `waiting_for_batch`, by intake or forming.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from .metrics import WorkerMetrics

__all__ = ["ACTIVITIES", "StageClock"]

#: Every stage's activities, in the order of the module's table.
ACTIVITIES: Final = {
    "form": ("waiting_for_requests", "forming", "waiting_for_room"),
    "run": ("waiting_for_batch", "waiting_for_making", "running", "waiting_to_settle"),
    "settle": ("waiting_for_batch", "settling"),
}


class StageClock:
    """Adds the time of each `timing(stage, activity)` block to the model's counter."""

    def __init__(self, metrics: WorkerMetrics, model: str) -> None:
        # Every series exists from the start (at 0), so a rate over any window is defined.
        self._counters = {
            (stage, activity): metrics.stage_time.labels(model=model, stage=stage, activity=activity)
            for stage, activities in ACTIVITIES.items()
            for activity in activities
        }

    @contextmanager
    def timing(self, stage: str, activity: str) -> Iterator[None]:
        """Count the block's wall time as `activity` of `stage` (even where it raises)."""
        counter = self._counters[(stage, activity)]
        started = time.perf_counter()
        try:
            yield
        finally:
            counter.inc(time.perf_counter() - started)
