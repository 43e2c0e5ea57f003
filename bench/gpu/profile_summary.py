"""The busiest threads and the hottest frames of a profiled worker (usage: profile_summary.py OUTDIR).

Reads OUTDIR/threads-before.txt and threads-after.txt (tid utime stime, from /proc, 6 s apart) and
OUTDIR/profile.txt (py-spy record --threads --format raw).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

WINDOW_S = 6.0
TICKS_PER_S = 100


def _ticks(path: Path) -> dict[str, int]:
    rows = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows[parts[0]] = int(parts[1]) + int(parts[2])
    return rows


def main(out: Path) -> None:
    """Print cores per thread over the profile's window, then the top (thread, leaf frame) pairs."""
    try:
        before, after = _ticks(out / "threads-before.txt"), _ticks(out / "threads-after.txt")
    except OSError as exc:
        print(f"no thread figures: {exc}")
    else:
        busy = sorted(((after[t] - before.get(t, 0)) / TICKS_PER_S / WINDOW_S, t) for t in after)[::-1]
        total = sum(cores for cores, _ in busy)
        print(
            f"worker process: {total:.2f} cores; busiest threads: "
            + ", ".join(f"{t}:{c:.2f}" for c, t in busy[:8])
        )
    try:
        lines = (out / "profile.txt").read_text().splitlines()
    except OSError as exc:
        print(f"no profile: {exc}")
        return
    stacks: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        stacks[frames[0] + " | " + (frames[-1] if len(frames) > 1 else "")] += int(count)
    samples = sum(stacks.values())
    print(f"py-spy: {samples} samples; top thread | leaf frames:")
    for key, count in stacks.most_common(25):
        print(f"{count / samples:6.1%}  {key[:150]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
