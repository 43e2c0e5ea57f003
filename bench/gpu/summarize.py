"""Print the GPU benchmark's table from the JSON files bench/gpu/run.sh wrote (usage: summarize.py OUTDIR)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def main(out: Path) -> None:
    """Print engine-only and end-to-end figures and the ratios the GPU issue asks for."""
    print((out / "gpu.txt").read_text().strip() if (out / "gpu.txt").is_file() else "(no gpu.txt)")
    engines: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("engine-*.json")):
        model = path.stem.removeprefix("engine-")
        engines[model] = _load(path)
        print(f"\nengine-only {model} ({engines[model][0]['backend']} v{engines[model][0]['version']})")
        print(f"{'batch':>6} {'img/s':>9} {'p50 ms':>8}")
        for row in engines[model]:
            print(f"{row['batch']:>6} {row['frames_per_s']:>9.0f} {row['latency_ms_p50']:>8.2f}")
    header = f"{'run':<22} {'load':>6} {'img/s':>8} {'images':>8} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6}"
    print(f"\n{header} {'GPU MiB before/after':>21}")
    best: dict[str, float] = {}
    idle_p50: dict[str, float] = {}
    for path in sorted(out.glob("e2e-*.json")):
        report = _load(path)
        for point in report["points"]:
            name = path.stem.removeprefix("e2e-") + ("-bare" if point["mode"].startswith("bare") else "")
            s = point["summary"]
            before, after = point.get("gpu_memory_before_bytes"), point.get("gpu_memory_after_bytes")
            memory = f"{before / 2**20:.0f}/{after / 2**20:.0f}" if before and after else "-"
            batch = f"{point['mean_batch']:.1f}" if point.get("mean_batch") else "-"
            row = f"{name:<22} {point['load']:>6g} {s['frames_per_s']:>8.0f} {s['frames']:>8}"
            row += f" {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f}"
            print(f"{row} {batch:>6} {memory:>21}  {s['errors'] or ''}")
            best[name] = max(best.get(name, 0.0), s["frames_per_s"])
            for stage, shares in (point.get("stage_shares") or {}).items():
                listed = ", ".join(
                    f"{a} {v:.2f}" for a, v in sorted(shares.items(), key=lambda i: -i[1]) if v >= 0.01
                )
                print(f"{'':<22} {stage}: {listed}")
            if point.get("gc_ms_per_request") is not None:
                gc_ms = point["gc_ms_per_request"]
                share = gc_ms * s["requests_per_s"] / 1000
                print(f"{'':<22} garbage collection: {gc_ms * 1000:.1f} us a request, {share:.1%} of time")
            if "idle" in name:
                idle_p50[name] = s["p50_ms"]
                timing = point.get("worker_timing_p50_ms") or {}
                if timing:  # where the time goes: the worker's own view of each reply
                    parts = ", ".join(f"{key} {value:.2f}" for key, value in sorted(timing.items()))
                    print(
                        f"{'':<22} worker p50 ms: {parts}; client p50 minus total_ms: "
                        f"{s['p50_ms'] - timing.get('total_ms', 0.0):.2f}"
                    )
    memory_files = sorted(out.glob("memory-*.txt"))
    if memory_files:
        print(f"\n{'GPU MiB used, whole run':<34} {'at 40%':>7} {'at 70%':>7} {'last':>7} {'max':>7}")
    for path in memory_files:
        # nvidia-smi's CSV lines: "memory.used, utilization.gpu"
        fields = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
        samples = [int(field) for field in fields if field.isdigit()]
        if samples:
            name = path.stem.removeprefix("memory-")
            at = [samples[int(len(samples) * f)] for f in (0.4, 0.7)]
            print(f"{name:<34} {at[0]:>7} {at[1]:>7} {samples[-1]:>7} {max(samples):>7}")
    for model, rows in sorted(engines.items()):
        engine_best = max(r["frames_per_s"] for r in rows)
        engine_b1 = next((r["latency_ms_p50"] for r in rows if r["batch"] == 1), None)
        print(f"\n{model} engine-only best: {engine_best:.0f} img/s")
        for name, value in sorted(best.items()):
            if name.startswith(f"{model}-") and "idle" not in name:
                print(f"ratio {name} / engine-only best: {value / engine_best:.3f}  ({value:.0f} img/s)")
        for name, p50 in sorted(idle_p50.items()):
            if name.startswith(f"{model}-") and engine_b1 is not None:
                print(
                    f"{name} p50 {p50:.2f} ms vs engine batch-1 p50 {engine_b1:.2f} ms: "
                    f"+{p50 - engine_b1:.2f} ms (target <= +1.5 ms)"
                )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
