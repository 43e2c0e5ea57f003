"""Which processes use the CPU while a command runs: cores per process over the window of one of them.

    python bench/cpu_share.py --window full.jsonl -- python bench/video_bench.py --repository DIR

Runs the command after `--`, samples every process's CPU time (/proc) twice a second, and prints,
for the time the process whose command line contains `--window` was alive, the cores each process
used (CPU seconds / wall seconds). Linux only. On a 2-core machine the sum is at most 2.0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main", "sample"]

_TICKS = os.sysconf("SC_CLK_TCK")


def sample() -> dict[int, tuple[float, str]]:
    """CPU seconds and command line of every readable process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():  # its own --window would match
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / _TICKS, command.strip())
    return out


def main() -> int:
    """Run the command, sample, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", required=True, help="text in the command line of the process to time")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    process = subprocess.Popen(command)
    samples: list[tuple[float, dict[int, tuple[float, str]]]] = []
    while process.poll() is None:
        samples.append((time.monotonic(), sample()))
        time.sleep(0.5)
    window = [
        (when, snapshot)
        for when, snapshot in samples
        if any(args.window in command for _, command in snapshot.values())
    ]
    if len(window) < 2:
        print(f"no process matching {args.window!r} was seen in two samples", file=sys.stderr)
        return 1
    (start, first), (end, last) = window[0], window[-1]
    seconds = end - start
    print(f"\ncores used while {args.window!r} ran ({seconds:.1f} s, {os.cpu_count()} cores):")
    total = 0.0
    for pid, (cpu, name) in sorted(
        last.items(), key=lambda item: item[1][0] - first.get(item[0], (0, ""))[0]
    ):
        used = (cpu - first.get(pid, (0.0, ""))[0]) / seconds
        if used >= 0.01:
            total += used
            print(f"{used:6.2f}  {name[:100]}")
    print(f"{total:6.2f}  in all")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
