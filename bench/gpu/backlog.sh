#!/usr/bin/env bash
# bench/gpu/backlog.sh OUTDIR — one `jetinfer serve` per GPU with no tuning flags, timed on a full stream
# (`jetinfer bench --backlog N`: N requests stored, then the worker started and timed answering them), so
# the load generators' own CPU is out of the loop; in the same call the engines alone, the same backlog
# with `--no-nvimgcodec` (the GPU lanes on the SMs) and with two tuned workers, a closed loop as
# bench/gpu/one_per_gpu.sh runs it (with the load processes' CPU read from /proc), and idle latency.
# ResNet-50 fp16 and the trivial model (bench/gpu/trivial_model.py), JPEG 224x224. Workers on
# WORKER_CPUS (default 0-9), nats-server and the load on the rest. Every run has its own time limit, and
# the table is printed and OUTDIR/results.tar.gz packed whatever happened. SET=variants runs ResNet-50's
# backlog instead with one setting changed at a time (N requests each, default 40,000); SET=lanes times
# the decoders alone, then the backlog with JPEGs decoded in processes, nvJPEG or the hardware JPEG engine,
# and their mixes; SET=sync times how threads wait for the GPU (bench/gpu/sync_probe.py), then both models
# with JPEGs in processes and on nvJPEG, and idle latency; SET=confirm the defaults again with the gpu
# tests of the GPU paths; SET=light the trivial model with decoding shared out between processes and nvJPEG
# lanes in other proportions; SET=plan what the plan chooses for both models against its former choice
# for the trivial model (8 processes, 2 nvJPEG lanes), and idle latency; SET=idle idle latency with a lone
# JPEG decoded on the GPU and in the asking thread, and both models' backlog once more; SET=light-plan the
# trivial model's 8-JPEG stream alone, with the plan's choice and its former one; SET=gc both models with
# the garbage collector as the worker tunes it and as Python has it (--gc-threshold 0); SET=pulls the
# trivial model's 1-JPEG backlog drained by 1, 2 and 4 workers and as many bare fetch/reply/ack loops
# (`--bare`); SET=gc-drain the collector's time while the trivial model's two streams drain; SET=fronts
# one process doing it all against front processes (--fronts K) on both models, and idle latency; SET=fronts-auto
# the defaults against --fronts; SET=fronts-confirm the defaults once more. Wheels: .whl/.
set -uo pipefail
RESULTS=${1:-${OUT:-/tmp/jetinfer-backlog}}
OUT=$RESULTS/data
mkdir -p "$OUT"
export TQDM_DISABLE=1
PY=python3
R=/tmp/jetinfer-gpu-models
CPUS=${WORKER_CPUS:-0-9}
step() { echo "== $(date +%T) $*" >&2; }
finish() {
    step summary
    $PY bench/gpu/summarize.py "$OUT" > "$OUT/summary.txt" 2>&1
    for f in "$OUT"/err-*.txt; do
        grep -h "chosen from" "$f" | sed "s|^.*serving from|$(basename "$f" .txt): serving from|" | head -1
    done >> "$OUT/summary.txt"
    [ -f "$OUT/decoders.txt" ] && cat "$OUT/decoders.txt" >> "$OUT/summary.txt"
    tar -czf "$RESULTS/results.tar.gz" -C "$OUT" .
    cat "$OUT/summary.txt"
}
trap finish EXIT

step install carried wheels
source bench/gpu/install.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc | sed 's/^/cpus /';
  $PY -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])'; } \
  2>&1 | tee "$OUT/gpu.txt"

step build
case ${SET:-all} in  # the models a set runs
    light | light-plan | pulls | gc-drain) MODELS=trivial ;;
    variants) MODELS=resnet50 ;;
    *) MODELS="resnet50 trivial" ;;
esac
if [[ $MODELS == *resnet50* ]]; then
    $PY -m jetinfer.cli --log-level WARNING build resnet50 --backend torch --fp16 --repository "$R" 2>&1 \
        | tail -1
fi
if [[ $MODELS == *trivial* ]]; then
    $PY bench/gpu/trivial_model.py /tmp/trivial > /dev/null
    $PY -m jetinfer.cli --log-level WARNING build /tmp/trivial/trivial.pt2 --config /tmp/trivial/config.json \
        --fp16 --repository "$R" --name trivial 2>&1 | tail -1
fi

step engine-only
for model in $MODELS; do
    timeout 60 $PY -m jetinfer.cli --log-level WARNING engine-bench --repository "$R" --model $model \
        --duration-s 2 --json --batch 1 --batch 128 --batch 256 > "$OUT/engine-$model.json"
done

run() {  # model name limit_s bench-args...
    local model=$1 name=$2 limit=$3; shift 3
    step "$model $name"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 \
        > "$OUT/memory-$model-$name.txt" &
    local sampler=$!
    timeout "$limit" $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model "$model" \
        --payload jpeg --worker-cpus "$CPUS" --no-progress --json "$OUT/e2e-$model-$name.json" \
        --worker-log-level INFO --worker-arg=--lag-poll-s=1 "$@" > "$OUT/out-$model-$name.txt" \
        2> "$OUT/err-$model-$name.txt" || echo "run $model $name failed (exit $?)" >&2
    kill "$sampler" 2>/dev/null
}
TUNED=(--worker-arg=--gpu-normalise --worker-arg=--decode-processes=4 --worker-arg=--gpu-decode
       --worker-arg=--gil-switch-ms=1 --worker-arg=--preprocess-lanes=1 --worker-arg=--pipeline-depth=1)

if [ "${SET:-all}" = variants ]; then  # ResNet-50's backlog with one setting changed at a time
    N=${N:-40000}
    run resnet50 backlog-default1 60 --backlog "$N" --timeout-s 20
    run resnet50 backlog-gil5ms1 60 --backlog "$N" --timeout-s 20 --worker-arg=--gil-switch-ms=0
    run resnet50 backlog-fetch8-1 60 --backlog "$N" --timeout-s 20 --worker-arg=--fetch-batches=8
    run resnet50 backlog-lanes4-1 60 --backlog "$N" --timeout-s 20 --worker-arg=--preprocess-lanes=4
    run resnet50 backlog-hw1 60 --backlog "$N" --timeout-s 20 --worker-arg=--nvimgcodec
    run resnet50 backlog-procs12-1 60 --backlog "$N" --timeout-s 20 --worker-arg=--decode-processes=12
    run resnet50 backlog-default1-again 60 --backlog "$N" --timeout-s 20
    exit
fi
if [ "${SET:-all}" = light ]; then  # the trivial model: how decoding is shared between processes and nvJPEG
    run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    run trivial backlog-gpulanes3-f8 60 --backlog 25000 --frames 8 --timeout-s 20 --worker-arg=--gpu-decode-lanes=3
    run trivial backlog-gpulanes4-f8 60 --backlog 25000 --frames 8 --timeout-s 20 --worker-arg=--gpu-decode-lanes=4
    run trivial backlog-procs4-gpulanes4-f8 60 --backlog 25000 --frames 8 --timeout-s 20 \
        --worker-arg=--decode-processes=4 --worker-arg=--gpu-decode-lanes=4
    run trivial backlog-procs6-gpulanes3-f8 60 --backlog 25000 --frames 8 --timeout-s 20 \
        --worker-arg=--decode-processes=6 --worker-arg=--gpu-decode-lanes=3
    run trivial backlog-all-nvjpeg-lanes4-f8 60 --backlog 25000 --frames 8 --timeout-s 20 \
        --worker-arg=--gpu-decode --worker-arg=--preprocess-lanes=4
    run trivial backlog-default1-again-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    run trivial backlog-default1-f1 60 --backlog 60000 --timeout-s 20
    run trivial backlog-procs4-gpulanes4-f1 60 --backlog 60000 --timeout-s 20 \
        --worker-arg=--decode-processes=4 --worker-arg=--gpu-decode-lanes=4
    exit
fi
light_layouts() {  # the trivial model's 8-JPEG stream: the plan's layout, its former one, the plan's again
    run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    run trivial backlog-procs8-gpulanes2-f8 60 --backlog 25000 --frames 8 --timeout-s 20 \
        --worker-arg=--decode-processes=8 --worker-arg=--gpu-decode-lanes=2
    run trivial backlog-default1-again-f8 60 --backlog 25000 --frames 8 --timeout-s 20
}
if [ "${SET:-all}" = light-plan ]; then
    light_layouts
    exit
fi
if [ "${SET:-all}" = pulls ]; then  # how far more pull connections go
    step "a JPEG's bytes to a CPU tensor for nvJPEG, per image"
    timeout 60 $PY - >> "$OUT/decoders.txt" 2>&1 <<'PY'
import timeit, warnings, numpy as np, torch
images = [bytes(np.random.default_rng(i).integers(0, 255, 20000, dtype=np.uint8)) for i in range(256)]
def per_image(): return [torch.frombuffer(bytearray(image), dtype=torch.uint8) for image in images]
def joined():
    flat = torch.from_numpy(np.frombuffer(bytearray(b"".join(images)), np.uint8))
    out, start = [], 0
    for image in images:
        out.append(flat[start : start + len(image)]); start += len(image)
    return out
for name, f in (("frombuffer(bytearray) each", per_image), ("one buffer, a view each", joined)):
    print(f"{name}: {min(timeit.repeat(f, number=20, repeat=5)) / 20 / 256 * 1e6:.2f} us per image")
PY
    cat "$OUT/decoders.txt" >&2
    run trivial backlog-pulls1-f1 90 --backlog 60000 --timeout-s 20 --bare
    run trivial backlog-pulls2-f1 120 --backlog 60000 --timeout-s 20 --bare --workers 2
    run trivial backlog-pulls4-f1 150 --backlog 60000 --timeout-s 20 --bare --workers 4 \
        --worker-arg=--decode-processes=1 --worker-arg=--gpu-decode-lanes=1
    exit
fi
if [ "${SET:-all}" = fronts ]; then  # front processes pulling and answering, one engine process
    run trivial backlog-default1-f1 60 --backlog 60000 --timeout-s 20
    run trivial backlog-fronts2-f1 60 --backlog 60000 --timeout-s 20 --worker-arg=--fronts=2
    run trivial backlog-fronts3-f1 60 --backlog 60000 --timeout-s 20 --worker-arg=--fronts=3
    run trivial backlog-fronts4-f1 60 --backlog 60000 --timeout-s 20 --worker-arg=--fronts=4
    run trivial backlog-fronts2-f8 60 --backlog 25000 --frames 8 --timeout-s 20 --worker-arg=--fronts=2
    run resnet50 backlog-fronts2 60 --backlog 40000 --timeout-s 20 --worker-arg=--fronts=2
    run resnet50 idle 40 --concurrency 1 --duration-s 5 --warmup-s 2
    run resnet50 idle-fronts2 40 --concurrency 1 --duration-s 5 --warmup-s 2 --worker-arg=--fronts=2
    exit
fi
if [ "${SET:-all}" = fronts-auto ]; then  # the defaults (fronts chosen from the engine's rate) against --fronts
    run trivial backlog-default1-f1 60 --backlog 60000 --timeout-s 20
    run trivial backlog-fronts0-f1 60 --backlog 60000 --timeout-s 20 --worker-arg=--fronts=0
    run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    run trivial backlog-fronts0-f8 60 --backlog 25000 --frames 8 --timeout-s 20 --worker-arg=--fronts=0
    run trivial backlog-default1-again-f1 60 --backlog 60000 --timeout-s 20
    run resnet50 backlog-default1 60 --backlog 40000 --timeout-s 20
    run resnet50 backlog-fronts2 60 --backlog 40000 --timeout-s 20 --worker-arg=--fronts=2
    run resnet50 idle 40 --concurrency 1 --duration-s 5 --warmup-s 2
    exit
fi
if [ "${SET:-all}" = fronts-confirm ]; then  # the defaults as shipped: front processes for both models
    run resnet50 backlog-default1 60 --backlog 40000 --timeout-s 20
    run resnet50 idle 40 --concurrency 1 --duration-s 5 --warmup-s 2
    run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    exit
fi
if [ "${SET:-all}" = gc-drain ]; then  # the collector's time while the trivial model's streams drain
    run trivial backlog-default1-f1 60 --backlog 60000 --timeout-s 20
    run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    exit
fi
if [ "${SET:-all}" = gc ]; then  # the garbage collector tuned (the default) and as Python has it, alternately
    run trivial backlog-default1-f1 60 --backlog 60000 --timeout-s 20
    run trivial backlog-gc700-f1 60 --backlog 60000 --timeout-s 20 --worker-arg=--gc-threshold=0
    run trivial backlog-default1-again-f1 60 --backlog 60000 --timeout-s 20
    run trivial backlog-gc700-again-f1 60 --backlog 60000 --timeout-s 20 --worker-arg=--gc-threshold=0
    run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    run trivial backlog-gc700-f8 60 --backlog 25000 --frames 8 --timeout-s 20 --worker-arg=--gc-threshold=0
    run resnet50 backlog-default1 60 --backlog 40000 --timeout-s 20
    run resnet50 backlog-gc700 60 --backlog 40000 --timeout-s 20 --worker-arg=--gc-threshold=0
    run resnet50 idle 40 --concurrency 1 --duration-s 5 --warmup-s 2
    run resnet50 idle-gc700 40 --concurrency 1 --duration-s 5 --warmup-s 2 --worker-arg=--gc-threshold=0
    exit
fi
if [ "${SET:-all}" = plan ]; then  # the plan's choice for both models against the layout it chose before
    light_layouts
    run trivial backlog-default1-f1 60 --backlog 60000 --timeout-s 20
    run resnet50 backlog-default1 60 --backlog 40000 --timeout-s 20
    run resnet50 backlog-default1-again 60 --backlog 40000 --timeout-s 20
    run resnet50 idle 40 --concurrency 1 --duration-s 5 --warmup-s 2
    exit
fi
if [ "${SET:-all}" = idle ]; then  # a lone JPEG decoded on the GPU or in the asking thread, and the plan again
    run resnet50 idle 40 --concurrency 1 --duration-s 5 --warmup-s 2
    run resnet50 idle-cpu-decode 40 --concurrency 1 --duration-s 5 --warmup-s 2 --worker-arg=--no-gpu-decode
    run resnet50 idle-again 40 --concurrency 1 --duration-s 5 --warmup-s 2
    run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    run resnet50 backlog-default1 60 --backlog 40000 --timeout-s 20
    exit
fi
if [ "${SET:-all}" = confirm ]; then  # the shipped defaults once more, with the gpu tests of the GPU paths
    N=${N:-40000}
    step "gpu tests (GPU decoding, the torch backend)"
    timeout 200 $PY -m pytest -m "gpu or trt" -q -p no:cacheprovider tests/test_torch_backend.py \
        tests/test_gpu_decode.py > "$OUT/gpu-tests.txt" 2>&1
    tail -3 "$OUT/gpu-tests.txt" | tee -a "$OUT/decoders.txt" >&2
    run resnet50 backlog-default1 60 --backlog "$N" --timeout-s 20
    run resnet50 backlog-all-nvjpeg 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode
    run resnet50 backlog-default1-again 60 --backlog "$N" --timeout-s 20
    run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
    run trivial backlog-default1-f1 60 --backlog 60000 --timeout-s 20
    run resnet50 idle 40 --concurrency 1 --duration-s 5 --warmup-s 2
    exit
fi
if [ "${SET:-all}" = sync ]; then  # how the GPU is waited for, and where JPEGs decode, on both models
    N=${N:-40000}
    step "waiting for the GPU"
    timeout 120 $PY bench/gpu/sync_probe.py "$R" resnet50 --seconds 2 > "$OUT/decoders.txt" 2>&1
    cat "$OUT/decoders.txt" >&2
    run resnet50 backlog-default1 60 --backlog "$N" --timeout-s 20
    run resnet50 backlog-mixed-lanes1 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode-lanes=1
    run resnet50 backlog-all-nvjpeg 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode
    run resnet50 backlog-all-nvjpeg-lanes3 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode \
        --worker-arg=--preprocess-lanes=3
    run resnet50 backlog-default1-again 60 --backlog "$N" --timeout-s 20
    run trivial backlog-default1-f1 60 --backlog 60000 --timeout-s 20
    run trivial backlog-all-nvjpeg-f1 60 --backlog 60000 --timeout-s 20 --worker-arg=--gpu-decode
    run trivial backlog-all-nvjpeg-lanes3-f1 60 --backlog 60000 --timeout-s 20 --worker-arg=--gpu-decode \
        --worker-arg=--preprocess-lanes=3
    run resnet50 idle 40 --concurrency 1 --duration-s 5 --warmup-s 2
    run resnet50 idle-all-nvjpeg 40 --concurrency 1 --duration-s 5 --warmup-s 2 --worker-arg=--gpu-decode
    exit
fi
if [ "${SET:-all}" = lanes ]; then  # where ResNet-50's JPEGs decode: processes, nvJPEG, the JPEG engine
    N=${N:-40000}
    step "decoders alone"
    timeout 90 $PY bench/gpu/decode_probe.py --batch 256 --seconds 2 --processes 8 > "$OUT/decoders.txt" 2>&1
    cat "$OUT/decoders.txt" >&2
    lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\))" >> "$OUT/gpu.txt"
    run resnet50 backlog-default1 60 --backlog "$N" --timeout-s 20
    run resnet50 backlog-nvjpeg-lanes1 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode-lanes=1
    run resnet50 backlog-nvjpeg-lanes2 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode-lanes=2
    run resnet50 backlog-hw-lanes1 60 --backlog "$N" --timeout-s 20 --worker-arg=--nvimgcodec \
        --worker-arg=--gpu-decode-lanes=1
    run resnet50 backlog-hw-lanes2 60 --backlog "$N" --timeout-s 20 --worker-arg=--nvimgcodec \
        --worker-arg=--gpu-decode-lanes=2
    run resnet50 backlog-all-hw 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode --worker-arg=--nvimgcodec
    run resnet50 backlog-all-hw-lanes3 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode \
        --worker-arg=--nvimgcodec --worker-arg=--preprocess-lanes=3
    run resnet50 backlog-all-nvjpeg 60 --backlog "$N" --timeout-s 20 --worker-arg=--gpu-decode
    exit
fi
run resnet50 backlog-default1 90 --backlog "${LONG:-120000}" --timeout-s 20
run resnet50 backlog-nohw1 60 --backlog 60000 --timeout-s 20 --worker-arg=--no-nvimgcodec
run resnet50 backlog-tuned2 60 --backlog 60000 --timeout-s 20 --workers 2 "${TUNED[@]}"
run trivial backlog-default1-f8 60 --backlog 25000 --frames 8 --timeout-s 20
run trivial backlog-nohw1-f8 60 --backlog 25000 --frames 8 --timeout-s 20 --worker-arg=--no-nvimgcodec
run trivial backlog-default1-f1 60 --backlog 100000 --timeout-s 20

step "closed loop, resnet50, no flags: the load processes' CPU"
run resnet50 closed-default1 45 --concurrency 1024 --clients 6 --duration-s 8 --warmup-s 3 &
bench=$!
sleep 20
top -b -n 1 -w 200 | head -40 > "$OUT/top-closed.txt"
wait $bench

for variant in idle idle-hw; do
    extra=()
    [ "$variant" = idle-hw ] && extra=(--worker-arg=--nvimgcodec)
    run resnet50 "$variant" 40 --concurrency 1 --duration-s 5 --warmup-s 2 "${extra[@]}"
done
