#!/usr/bin/env bash
# bench/gpu/profile_backlog.sh OUTDIR — where one no-flags worker's GIL goes while it drains a full stream
# (trivial model, JPEG 224x224, 1 and 8 a message): py-spy samples only the threads holding the GIL
# (--gil), and the summary counts the functions on those stacks. Wheels: .whl/.
set -uo pipefail
RESULTS=${1:-${OUT:-/tmp/jetinfer-profile}}
OUT=$RESULTS/data
mkdir -p "$OUT"
PY=python3
R=/tmp/jetinfer-gpu-models
source bench/gpu/install.sh
$PY bench/gpu/trivial_model.py /tmp/trivial > /dev/null
$PY -m jetinfer.cli --log-level WARNING build /tmp/trivial/trivial.pt2 --config /tmp/trivial/config.json --fp16 \
    --repository "$R" --name trivial 2>&1 | tail -1
for frames in 1 8; do
    count=$((160000 / frames))
    timeout 120 $PY -m jetinfer.cli --log-level WARNING bench --embedded --repository "$R" --model trivial \
        --payload jpeg --frames $frames --worker-cpus 0-9 --no-progress --backlog $count --timeout-s 20 \
        --json "$OUT/e2e-trivial-f$frames.json" --worker-log-level INFO --worker-arg=--lag-poll-s=1 \
        > /dev/null 2> "$OUT/err-f$frames.txt" &
    bench=$!
    for _ in $(seq 100); do grep -q "serving from" "$OUT/err-f$frames.txt" 2>/dev/null && break; sleep 0.5; done
    sleep 2
    pid=$(pgrep -f "jetinfer.cli.* serve" | head -1)
    py-spy record --pid "$pid" --duration 6 --rate 250 --gil --threads --format raw -o "$OUT/gil-f$frames.txt" \
        --nonblocking > /dev/null 2>&1
    py-spy record --pid "$pid" --duration 3 --rate 250 --threads --format raw -o "$OUT/all-f$frames.txt" \
        --nonblocking > /dev/null 2>&1
    wait $bench
done
$PY - "$OUT" <<'PY'
import collections, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("*-f*.txt")):
    if not path.name.startswith(("gil", "all")):
        continue
    threads, leaf, inclusive, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count); total += n
        frames = stack.split(";")
        threads[frames[0][:40]] += n
        leaf[frames[-1][:110]] += n
        for f in set(f.split(" (")[0] for f in frames[1:]):
            inclusive[f[:80]] += n
    print(f"\n== {path.name}: {total} samples; by thread:")
    for t, n in threads.most_common(8): print(f"  {n / total:6.1%} {t}")
    print("  leaf functions:")
    for f, n in leaf.most_common(22): print(f"  {n / total:6.1%} {f}")
    print("  inclusive (jetinfer and libraries):")
    for f, n in inclusive.most_common(40): print(f"  {n / total:6.1%} {f}")
for path in sorted(out.glob("e2e-*.json")):
    p = json.loads(path.read_text())["points"][0]
    print(path.name, round(p["summary"]["frames_per_s"]), p["summary"]["frames"], p.get("mean_batch"), p["summary"]["errors"])
PY
tar -czf "$RESULTS/results.tar.gz" -C "$OUT" .
