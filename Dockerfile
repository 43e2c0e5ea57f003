# syntax=docker/dockerfile:1.7
#
# jetinfer images, one Dockerfile, three targets:
#   docker build --target gpu   -t jetinfer:gpu   .   # GPU worker: TensorRT and CUDA from NVIDIA's image
#   docker build --target cpu   -t jetinfer:cpu   .   # CPU worker (ONNX Runtime), sidecar, producer CLIs
#   docker build --target tools -t jetinfer:tools .   # cpu + torch CPU: `jetinfer export-demo`, demos
# Every image runs as the non-root user 10001, ENTRYPOINT ["jetinfer"], CMD ["serve"], and checks
# /healthz (deploy/docker/healthcheck.py). Base images are pinned; bump them on purpose: a TensorRT
# engine (.plan) only loads under the TensorRT version that built it, so rebuild engines with the image.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.08-py3
# The version in pyproject.toml (tests/test_deploy.py checks that they agree).
ARG JETINFER_VERSION=0.1.0

# ---------------------------------------------------------------------------------------------------
# wheel: build the jetinfer wheel (pure Python). Only this stage sees the source tree.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jetinfer ./jetinfer
COPY worker ./worker
COPY producer ./producer
COPY builder ./builder
COPY bench ./bench
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------
# cpu-venv: the runtime dependencies in a virtual environment that the cpu image copies whole.
FROM ${PYTHON_IMAGE} AS cpu-venv
ARG JETINFER_VERSION
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels "jetinfer==${JETINFER_VERSION}"

# tools-venv: cpu-venv plus the `export` and `demo` extras, with the CPU build of torch.
FROM cpu-venv AS tools-venv
ARG JETINFER_VERSION
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels "jetinfer[export,demo]==${JETINFER_VERSION}"

# ---------------------------------------------------------------------------------------------------
# runtime: what the cpu and tools images share. No compilers, no pip cache, no source tree.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# /models is the default model repository; owned by the user so that a fresh Docker volume mounted
# there (docker-compose.yml) is writable by the export job.
RUN groupadd --system --gid 10001 jetinfer \
    && useradd --system --uid 10001 --gid jetinfer --create-home --home-dir /home/jetinfer \
       --shell /usr/sbin/nologin jetinfer \
    && install -d -o jetinfer -g jetinfer /models
COPY deploy/docker/healthcheck.py /usr/local/bin/jetinfer-healthcheck
WORKDIR /home/jetinfer
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/usr/local/bin/jetinfer-healthcheck"]
ENTRYPOINT ["jetinfer"]
CMD ["serve"]

FROM runtime AS tools
COPY --from=tools-venv /opt/venv /opt/venv
USER 10001:10001

FROM runtime AS cpu
COPY --from=cpu-venv /opt/venv /opt/venv
USER 10001:10001

# ---------------------------------------------------------------------------------------------------
# gpu: NVIDIA's TensorRT image brings CUDA, cuDNN, TensorRT and its Python bindings; this layer adds
# only jetinfer and its Python dependencies (the `gpu` extra: cuda-bindings for TensorRT buffers and
# streams, nvidia-ml-py for GPU metrics). cuda-bindings must match the image's CUDA major version.
FROM ${TENSORRT_IMAGE} AS gpu
ARG JETINFER_VERSION
ARG CUDA_BINDINGS_VERSION=13.0.1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
# Installed into the image's own Python, next to its tensorrt package.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    python3 -m pip install --no-cache-dir --find-links /wheels \
        "jetinfer[gpu]==${JETINFER_VERSION}" "cuda-bindings==${CUDA_BINDINGS_VERSION}"
RUN groupadd --system --gid 10001 jetinfer \
    && useradd --system --uid 10001 --gid jetinfer --create-home --home-dir /home/jetinfer \
       --shell /usr/sbin/nologin jetinfer \
    && install -d -o jetinfer -g jetinfer /models
COPY deploy/docker/healthcheck.py /usr/local/bin/jetinfer-healthcheck
USER 10001:10001
WORKDIR /home/jetinfer
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "/usr/local/bin/jetinfer-healthcheck"]
ENTRYPOINT ["jetinfer"]
CMD ["serve"]
