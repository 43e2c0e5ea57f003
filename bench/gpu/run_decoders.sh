#!/usr/bin/env bash
# bench/gpu/run_decoders.sh OUTDIR — `--gpu-decode` with nvImageCodec (the GPU's JPEG engine) against
# torchvision's nvJPEG, on the H100 in one call: the decoders alone (bench/gpu/decode_probe.py), then
# ResNet-50 fp16 end to end with one and two workers, engine-only in the same call. Needs .whl/
# from bench/gpu/fetch_wheels.sh (it carries nvidia-nvimgcodec-cu13). The workers use torchvision
# unless JETINFER_NVIMGCODEC=1 is exported.
set -euo pipefail
OUT=${1:-${OUT:-/tmp/jetinfer-gpu-decoders}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD TQDM_DISABLE=1
PY=python3
R=/tmp/jetinfer-gpu-models
step() { echo "== $(date +%T) $*" >&2; }

step install carried wheels
source bench/gpu/install.sh

step decoders alone
$PY bench/gpu/decode_probe.py --batch 128 --seconds 3 2>&1 | grep -v Warning | tee "$OUT/decoders.txt"

step build resnet50
$PY -m jetinfer.cli --log-level WARNING build resnet50 --backend torch --fp16 --repository "$R" 2>&1 | tail -2
$PY -m jetinfer.cli --log-level WARNING engine-bench --repository "$R" --model resnet50 --duration-s 2 --json \
    --batch 1 --batch 128 --batch 256 > "$OUT/engine-resnet50.json"

for workers in ${GPU_WORKERS:-1 2}; do
    step "end to end, $workers --gpu-decode worker(s)"
    $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload jpeg \
        --concurrency 1024 --clients 8 --workers "$workers" --duration-s 6 --warmup-s 3 --no-progress \
        --json "$OUT/e2e-resnet50-jpeg-gpu-w$workers.json" --worker-arg=--lag-poll-s=1 --worker-arg=--gpu-decode \
        > /dev/null || echo "run with $workers workers failed" >&2
done
step summary
$PY bench/gpu/summarize.py "$OUT"
