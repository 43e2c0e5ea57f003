#!/usr/bin/env bash
# bench/gpu/run_multi.sh OUTDIR — scale-out on a machine of two GPUs (the device tool's nvidia-h200-x2):
# one nats-server, one load generator (4 processes), and 1 worker on GPU 0, 2 workers sharing GPU 0, then
# 1 worker per GPU on GPUs 0 and 1, all at the same offered load; prints a table last.
set -euo pipefail
OUT=${1:-${OUT:-/tmp/jetinfer-gpu-multi}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD TQDM_DISABLE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=python3
R=/tmp/jetinfer-gpu-models
step() { echo "== $(date +%T) $*" >&2; }

step install carried wheels
source bench/gpu/install.sh
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
nproc | sed 's/^/cpus /' | tee -a "$OUT/gpu.txt"

step build resnet50
$PY -m jetinfer.cli --log-level WARNING build resnet50 --backend torch --fp16 --repository "$R" 2>&1 | tail -2
$PY -m jetinfer.cli --log-level WARNING engine-bench --repository "$R" --model resnet50 --duration-s 2 --json \
    --batch 1 --batch 64 --batch 256 > "$OUT/engine-resnet50.json"

run() {  # name workers devices payload
    $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload "$4" \
        --concurrency 512 --clients 6 --workers "$2" --devices "$3" --duration-s 6 --warmup-s 3 --no-progress \
        --json "$OUT/e2e-$1.json" --worker-arg=--lag-poll-s=1 > /dev/null
}
step "1 worker on GPU 0";            run w1-gpu0 1 0 jpeg
step "2 workers sharing GPU 0";      run w2-gpu0 2 0 jpeg
step "1 worker per GPU on 0 and 1";  run w2-gpu01 2 0,1 jpeg
step "4 workers, 2 per GPU";         run w4-gpu01 4 0,1 jpeg

step summary
$PY bench/gpu/summarize.py "$OUT"
