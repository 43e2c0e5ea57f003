#!/usr/bin/env bash
# bench/peers/setup.sh: the peers' virtual environments under /work/main/.peers/ (git-excluded), from PyPI,
# pinned. Idempotent: a venv whose pins are already installed is left alone (a stamp file per venv).
#   .peers/faststream  FastStream 0.7.8 + nats-py 2.14.0 (FastStream 0.7.8's batch loop dies on a bare
#                      asyncio.TimeoutError with nats-py 2.15/2.16), ONNX Runtime, Pillow
#   .peers/pytriton    Debian's /usr/bin/python3 (PyTriton's Python backend needs a shared libpython;
#                      the pyenv Python lacks one) + nvidia-pytriton (ships tritonserver), ONNX Runtime, Pillow
#   .peers/pyspy       py-spy, for a quick profile of a running worker
# The plain nats-py worker runs from the repository's own .venv (same nats-py, ONNX Runtime, Pillow as jetinfer).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=$ROOT/.peers
mkdir -p "$PEERS"

# Keep .peers/ out of git without touching .gitignore.
EXCLUDE=$(git -C "$ROOT" rev-parse --git-path info/exclude)
case $EXCLUDE in /*) ;; *) EXCLUDE=$ROOT/$EXCLUDE ;; esac
mkdir -p "$(dirname "$EXCLUDE")"
touch "$EXCLUDE"
grep -qxF '/.peers/' "$EXCLUDE" || echo '/.peers/' >> "$EXCLUDE"

# The same engine and decoder versions as jetinfer's .venv, so only the serving path differs.
ORT=onnxruntime==1.32.0
PILLOW=pillow==13.0.0
NUMPY=numpy==2.4.6
MSGPACK=msgpack==1.2.4

venv() { # venv NAME PYTHON PACKAGE...
    local name=$1 python=$2
    shift 2
    local dir=$PEERS/$name stamp=$PEERS/$name/.installed
    local want="$python $*"
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        echo "setup: $name up to date ($dir)"
        return
    fi
    echo "setup: $name: $*"
    [[ -x $dir/bin/python ]] || "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }
    echo "$want" > "$stamp"
}

venv faststream "$ROOT/.venv/bin/python" "faststream[nats]==0.7.8" nats-py==2.14.0 $ORT $PILLOW $NUMPY $MSGPACK
venv pytriton /usr/bin/python3 nvidia-pytriton==0.7.0 $ORT $PILLOW $MSGPACK
venv pyspy "$ROOT/.venv/bin/python" py-spy==0.4.3

for name in faststream pytriton pyspy; do
    echo "== $name: $("$PEERS/$name/bin/python" --version)"
    "$PEERS/$name/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
        | grep -iE '^(faststream|nats-py|nvidia-pytriton|tritonclient|onnxruntime|pillow|numpy|msgpack|py-spy) ' || true
done
