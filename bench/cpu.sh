#!/usr/bin/env bash
# bench/cpu.sh OUTDIR — the CPU figures of docs/benchmarks.md, on this 2-core machine, in one run.
#   1. EfficientNet-Lite0 (ONNX Runtime CPU): end to end through NATS vs engine-only, and idle latency;
#      1b. the same under load with two batches at once (--parallel-batches=2)
#   2. identity with 1 KB tensors: the worker vs the bare nats-py fetch/ack/reply loop, three rounds
# Rounds alternate the worker and its baselines: this machine's speed drifts by tens of per cent.
#   3. a 1,000-frame video through `jetinfer video`, vs engine-only, and a resumed re-run
# Needs `make install` and the demo models (`jetinfer export-demo --repository DIR`).
set -euo pipefail
OUT=${1:-/tmp/jetinfer-cpu}
R=${JETINFER_BENCH_REPOSITORY:-$HOME/.cache/jetinfer/models}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"
export TQDM_DISABLE=1
step() { echo "== $(date +%T) $*" >&2; }

step export demo models into "$R"
"$BIN/jetinfer" --log-level WARNING export-demo --repository "$R" --models efficientnet_lite0,identity --no-progress

step "1. efficientnet_lite0: end to end (JPEG 224x224) vs engine-only, same run"
"$BIN/jetinfer" --log-level WARNING bench --embedded --repository "$R" --model efficientnet_lite0 --payload jpeg \
    --concurrency 1 8 32 --duration-s 10 --warmup-s 3 --engine-only --engine-batch 1 --engine-batch 8 \
    --engine-batch 32 --no-progress --json "$OUT/efficientnet.json" --plot "$OUT/efficientnet.png" | tee "$OUT/efficientnet.txt"

step "1b. efficientnet_lite0 under load with --parallel-batches=2 (two batches at once, one core each)"
"$BIN/jetinfer" --log-level WARNING bench --embedded --repository "$R" --model efficientnet_lite0 --payload jpeg \
    --concurrency 32 128 --duration-s 10 --warmup-s 3 --engine-only --engine-batch 1 --engine-batch 32 \
    --worker-arg=--parallel-batches=2 --rounds 2 --no-progress --json "$OUT/efficientnet-parallel.json" \
    | tee "$OUT/efficientnet-parallel.txt"

step "2. identity, 1 KB tensors: worker vs bare loop, same run"
"$BIN/jetinfer" --log-level WARNING bench --embedded --repository "$R" --model identity --payload tensor --shape 256 \
    --concurrency 64 256 --duration-s 10 --warmup-s 2 --bare --rounds 3 --no-progress --json "$OUT/identity.json" \
    --plot "$OUT/identity.png" | tee "$OUT/identity.txt"

step "3. a 1,000-frame video"
"$BIN/python" bench/video_bench.py --repository "$R" --frames 1000 --out "$OUT" | tee "$OUT/video.txt"
