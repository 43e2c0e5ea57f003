#!/usr/bin/env bash
# bench/gpu/one_per_gpu.sh OUTDIR — one `jetinfer serve` per GPU with no tuning flags, as the GPU overlay
# runs it, on the GPU machine in one call: gpu tests, ResNet-50 fp16 and a trivial model (the engine
# not the limit) engine-only, then end to end with JPEG 224x224 requests: one worker with its defaults
# (>= 100k requests, GPU memory sampled), two tuned workers (the best of before), one worker with the
# asyncio loop and with a GPU decode lane beside its processes, the trivial model three ways, idle
# latency, and a py-spy profile of the default worker under load. Before them, the JPEG decoders alone
# (bench/gpu/decode_probe.py: nvJPEG, nvImageCodec on the hardware JPEG engine, Pillow processes), and
# each "no flags" run again with `--no-nvimgcodec` (the lanes on the SMs, as before the JPEG engine).
# Prints the table last and packs every file into OUTDIR/results.tar.gz (the device tool brings back
# a few files only).
#
# The workers run on WORKER_CPUS (default 0-9, as a pod's CPU limit would give them); nats-server and
# CLIENTS load processes (default 6) on the other cores. The trivial model's requests carry LIGHT_FRAMES
# JPEGs each (default 8: a batch job's messages, a BYTES input). QUICK=1 leaves out the gpu tests and the
# profile; VARIANTS=1 adds the asyncio loop and explicit GPU-lane runs. Wheels: .whl/ (bench/gpu/fetch_wheels.sh).
set -uo pipefail
RESULTS=${1:-${OUT:-/tmp/jetinfer-one-per-gpu}}
OUT=$RESULTS/data
mkdir -p "$OUT"
export TQDM_DISABLE=1
PY=python3
R=/tmp/jetinfer-gpu-models
CPUS=${WORKER_CPUS:-0-9}
CLIENTS=${CLIENTS:-6}
step() { echo "== $(date +%T) $*" >&2; }

step install carried wheels
source bench/gpu/install.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc | sed 's/^/cpus /';
  lscpu | grep -E "^(Model name|Thread|Core|Socket)" ;
  $PY -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])';
  $PY -c 'import nvidia.nvimgcodec as n, nvidia.nvjpeg as j; print("nvimgcodec", n.__version__, "nvjpeg", list(j.__path__))';
  } 2>&1 | tee "$OUT/gpu.txt"

step "gpu tests (in the background while the models build)"
if [ "${QUICK:-0}" != 1 ]; then
    $PY -m pytest -m "gpu or trt" -q -p no:cacheprovider tests/test_torch_backend.py tests/test_gpu_decode.py \
        tests/test_decode_processes.py tests/test_own_model.py > "$OUT/gpu-tests.txt" 2>&1 &
    tests=$!
fi
$PY -m jetinfer.cli --log-level WARNING build resnet50 --backend torch --fp16 --repository "$R" 2>&1 | tail -2
$PY bench/gpu/trivial_model.py /tmp/trivial > /dev/null
$PY -m jetinfer.cli --log-level WARNING build /tmp/trivial/trivial.pt2 --config /tmp/trivial/config.json --fp16 \
    --repository "$R" --name trivial 2>&1 | tail -2
[ -n "${tests:-}" ] && { wait "$tests"; tail -3 "$OUT/gpu-tests.txt"; }

step "the JPEG decoders alone (224x224, batch 256)"
$PY bench/gpu/decode_probe.py --batch 256 --seconds 2 --processes 8 2>&1 | grep -v Warning | tee "$OUT/decoders.txt"

step engine-only
$PY -m jetinfer.cli --log-level WARNING engine-bench --repository "$R" --model resnet50 --duration-s 2 --json \
    --batch 1 --batch 32 --batch 128 --batch 256 > "$OUT/engine-resnet50.json"
$PY -m jetinfer.cli --log-level WARNING engine-bench --repository "$R" --model trivial --duration-s 2 --json \
    --batch 1 --batch 64 --batch 256 > "$OUT/engine-trivial.json"

e2e() {  # model name workers duration extra-bench-args...
    local model=$1 name=$2 workers=$3 duration=$4; shift 4
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 \
        > "$OUT/memory-$model-$name.txt" &
    local sampler=$!
    $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model "$model" --payload jpeg \
        --concurrency "${CONCURRENCY:-1024}" --clients "$CLIENTS" --workers "$workers" --worker-cpus "$CPUS" \
        --duration-s "$duration" --warmup-s 3 --no-progress --json "$OUT/e2e-$model-$name.json" \
        --worker-log-level INFO --worker-arg=--lag-poll-s=1 "$@" > "$OUT/out-$model-$name.txt" \
        2> "$OUT/err-$model-$name.txt" \
        || echo "run $model $name failed (exit $?)" >&2
    kill "$sampler" 2>/dev/null
}
TUNED=(--worker-arg=--gpu-normalise --worker-arg=--decode-processes=4 --worker-arg=--gpu-decode
       --worker-arg=--gil-switch-ms=1 --worker-arg=--preprocess-lanes=1 --worker-arg=--pipeline-depth=1)

step "resnet50: one worker, no flags (>= 100k requests), two tuned workers, variants"
e2e resnet50 default1 1 "${LONG:-14}"
e2e resnet50 nohw1 1 6 --worker-arg=--no-nvimgcodec
e2e resnet50 tuned2 2 6 "${TUNED[@]}"
e2e resnet50 default1-again 1 6
if [ "${VARIANTS:-0}" = 1 ]; then
    e2e resnet50 asyncio1 1 6 --worker-arg=--event-loop=asyncio
    e2e resnet50 gpulane1 1 6 --worker-arg=--gpu-decode-lanes=1
fi

step "trivial model, ${LIGHT_FRAMES:=8} JPEGs a message: one worker, no flags; every JPEG on the GPU"
e2e trivial default1 1 6 --frames "$LIGHT_FRAMES"
e2e trivial nohw1 1 6 --frames "$LIGHT_FRAMES" --worker-arg=--no-nvimgcodec
[ "${VARIANTS:-0}" != 1 ] || e2e trivial gpulane1 1 6 --frames "$LIGHT_FRAMES" --worker-arg=--gpu-decode-lanes=1
e2e trivial gpudecode1 1 6 --frames "$LIGHT_FRAMES" --worker-arg=--gpu-decode --worker-arg=--no-nvimgcodec
e2e trivial hwdecode1 1 6 --frames "$LIGHT_FRAMES" --worker-arg=--gpu-decode --worker-arg=--nvimgcodec

step "idle: one JPEG at a time, one worker, no flags (a lone JPEG on the GPU), then decoded on the CPU"
for variant in idle idle-hw idle-cpu; do
    extra=()
    [ "$variant" = idle-hw ] && extra=(--worker-arg=--nvimgcodec)
    [ "$variant" = idle-cpu ] && extra=(--worker-arg=--no-gpu-decode)
    $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload jpeg \
        --concurrency 1 --duration-s 5 --warmup-s 2 --no-progress --worker-cpus "$CPUS" \
        --json "$OUT/e2e-resnet50-$variant.json" --worker-arg=--lag-poll-s=1 "${extra[@]}" > /dev/null \
        2> "$OUT/err-$variant.txt"
done

if [ "${QUICK:-0}" != 1 ]; then
step "profile: one worker, no flags, under load (py-spy, per-thread CPU)"
$PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 --payload jpeg \
    --concurrency 1024 --clients "$CLIENTS" --workers 1 --worker-cpus "$CPUS" --duration-s 14 --warmup-s 3 \
    --no-progress --json "$OUT/e2e-resnet50-profiled.json" --worker-arg=--lag-poll-s=1 \
    > /dev/null 2> "$OUT/err-profiled.txt" &
bench=$!
sleep 14
pid=$(pgrep -f "jetinfer.cli.* serve" | head -1)
if [ -n "$pid" ]; then
    for t in /proc/"$pid"/task/*; do echo "$(basename "$t") $(cut -d' ' -f14,15 "$t/stat")"; done > "$OUT/threads-before.txt"
    py-spy record --pid "$pid" --duration 6 --rate 200 --threads --format raw -o "$OUT/profile.txt" --nonblocking \
        > "$OUT/py-spy.log" 2>&1
    for t in /proc/"$pid"/task/*; do echo "$(basename "$t") $(cut -d' ' -f14,15 "$t/stat")"; done > "$OUT/threads-after.txt"
    py-spy dump --pid "$pid" > "$OUT/dump.txt" 2>&1
    top -b -n 1 | head -30 > "$OUT/top.txt"
fi
wait $bench
fi

step summary
$PY bench/gpu/summarize.py "$OUT" | tee "$OUT/summary.txt"
[ -f "$OUT/profile.txt" ] && $PY bench/gpu/profile_summary.py "$OUT" | tee -a "$OUT/summary.txt"
grep -h "chosen from" "$OUT"/err-*-default1.txt 2>/dev/null | sed 's/^.*serving from/serving from/' | head -2
tar -czf "$RESULTS/results.tar.gz" -C "$OUT" .
