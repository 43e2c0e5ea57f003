"""CPU time per thread of a process tree over a few seconds, with Python thread names from py-spy.

    python bench/peers/thread_cpu.py --pid PID --seconds 10 --output FILE

Reads utime+stime of every thread of PID and its descendants from /proc at the start and the end, and
meanwhile dumps the Python stacks of each process with `py-spy dump` once a second, to name the threads
(a thread that py-spy never shows has no Python frames: a native thread, such as ONNX Runtime's intra-op
pool, or a C++ server's). Prints one line per thread: CPU seconds, share, process, thread name and the
frame it was most often seen in. `bench/peers/run.sh` runs it as a `cpu_cost.py --hook` under load.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

__all__ = ["dump_threads", "main", "thread_cpu", "tree_pids"]

_TICKS = os.sysconf("SC_CLK_TCK")
_THREAD = re.compile(r'^Thread (0x[0-9A-Fa-f]+|\d+) \((\w+)\): "([^"]*)"')


def tree_pids(root: int) -> list[int]:
    """`root` and its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def thread_cpu(pids: list[int]) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, tid) -> (process name, CPU seconds) for every thread of the given processes."""
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[(pid, tid)] = (name, (int(fields[11]) + int(fields[12])) / _TICKS)
    return out


def dump_threads(py_spy: str, pid: int) -> dict[int, tuple[str, str, str]]:
    """tid -> (Python thread name, idle/active, top frame) from one `py-spy dump` (empty if not Python)."""
    try:
        text = subprocess.run(
            [py_spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[int, tuple[str, str, str]] = {}
    current: int | None = None
    for line in text.splitlines():
        match = _THREAD.match(line)
        if match:
            current = int(match.group(1), 0)
            out[current] = (match.group(3), match.group(2), "")
        elif current is not None and line.strip() and not out[current][2]:
            name, state, _ = out[current]
            out[current] = (name, state, line.strip()[:100])
    return out


def main() -> int:
    """Sample, dump, sample again, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pid", type=int, required=True, help="the root of the process tree")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--delay-s", type=float, default=1.0, help="wait this long first")
    parser.add_argument(
        "--py-spy", default=str(Path(__file__).resolve().parents[2] / ".peers/pyspy/bin/py-spy")
    )
    parser.add_argument("--output", type=Path, help="write the table here (default: stdout)")
    args = parser.parse_args()
    time.sleep(args.delay_s)
    pids = tree_pids(args.pid)
    start, began = thread_cpu(pids), time.monotonic()
    names: dict[tuple[int, int], str] = {}
    frames: dict[tuple[int, int], Counter[str]] = {}
    while time.monotonic() - began < args.seconds:
        for pid in pids:
            for tid, (name, state, frame) in dump_threads(args.py_spy, pid).items():
                names[(pid, tid)] = name
                if state == "active":
                    frames.setdefault((pid, tid), Counter())[frame] += 1
        time.sleep(max(0.0, min(1.0, args.seconds - (time.monotonic() - began))))
    end, wall = thread_cpu(pids), time.monotonic() - began
    used = {key: cpu - start.get(key, (name, 0.0))[1] for key, (name, cpu) in end.items()}
    total = sum(used.values()) or 1.0
    lines = [f"threads of {args.pid} and its descendants: {total:.2f} CPU s over {wall:.1f} s"]
    for key in sorted(used, key=lambda k: -used[k]):
        if used[key] < 0.01:
            continue
        pid, tid = key
        name = names.get(key, "(native: no Python frames)")
        seen = frames.get(key)
        frame = seen.most_common(1)[0][0] if seen else ""
        share = 100 * used[key] / total
        lines.append(f"  {used[key]:6.2f} s {share:5.1f}%  {end[key][0]}[{pid}] {tid}: {name}  {frame}")
    text = "\n".join(lines) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
