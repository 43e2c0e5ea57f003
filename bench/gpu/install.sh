# Sourced by the bench/gpu scripts on the GPU machine (no network): install the carried wheels (.whl/,
# from bench/gpu/fetch_wheels.sh) and set PY, PYTHONPATH and PATH. nvImageCodec (and nvJPEG, where the
# machine lacks it) go into the interpreter's own site-packages: their `nvidia` package must not shadow
# the one torch's CUDA libraries live in; the rest into /tmp/site.
PY=python3
nvidia=(.whl/nvidia_nvimgcodec_*.whl)
$PY -c 'import nvidia.nvjpeg' 2>/dev/null || nvidia+=(.whl/nvidia_nvjpeg-*.whl)
$PY -m pip install -q --no-index --no-deps --no-cache-dir --break-system-packages "${nvidia[@]}" 2>&1 | tail -2
others=(); for w in .whl/*.whl; do case $w in .whl/nvidia_*) ;; *) others+=("$w") ;; esac; done
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${others[@]}" 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH TQDM_DISABLE=1
