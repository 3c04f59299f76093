# syntax=docker/dockerfile:1
# catdog-serve image. Targets: `runtime` (CPU, default), `gpu` (onnxruntime-gpu, CUDA 13) and
# `openvino` (onnxruntime-openvino: Intel's runtime on the CPU).
#   docker build -t catdog-serve .                 # or: make image (buildah, offline-friendly)
#   docker build --target gpu -t catdog-serve:gpu .
#   docker build --target openvino -t catdog-serve:openvino .
# checkov:skip=CKV_DOCKER_7:the base images are ARGs whose defaults are pinned tags; checkov cannot resolve ARGs
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: the export stack builds the ONNX models; a clean venv gets the runtime deps only.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# Optional local wheelhouse and weight-source cache (make image fills both on the host and builds
# with PIP_NO_INDEX=1); when they are empty pip and the weight fetch use the index.
ARG PIP_FIND_LINKS=/wheels
ARG PIP_NO_INDEX=0
WORKDIR /src
COPY deploy/wheels/ /wheels/
COPY deploy/cache/ /tmp/cache/
# Dependencies first, so a code change does not reinstall TensorFlow.
COPY pyproject.toml README.md ./
COPY model_export/__init__.py model_export/__init__.py
COPY service/__init__.py service/__init__.py
COPY catdog_core/__init__.py catdog_core/__init__.py
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --find-links "${PIP_FIND_LINKS}" ".[export]"
COPY catdog_core/ catdog_core/
COPY model_export/ model_export/
COPY service/ service/
# The manifest records the commit; there is no .git in the build context.
ARG GIT_COMMIT=unknown
ENV CATDOG_GIT_COMMIT=${GIT_COMMIT}
RUN /opt/build/bin/pip install --no-deps . \
    && /opt/build/bin/python -m model_export --cache-dir /tmp/cache build --out /models \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --find-links "${PIP_FIND_LINKS}" . \
    && rm -rf /tmp/cache

# --- runtime: python slim, the service and the built models; no compilers, no training stack.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:${PATH} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    CATDOG_MODELS_DIR=/models CATDOG_LOG_JSON=true
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /models /models
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2).status != 200)"]
# Exec form: uvicorn is PID 1 and gets SIGTERM; it drains for CATDOG_DRAIN_TIMEOUT_S.
ENTRYPOINT ["catdog-serve", "--host", "0.0.0.0", "--port", "8000"]

# --- gpu: the runtime image with onnxruntime-gpu. CUDA 13 and cuDNN 9 come as NVIDIA's wheels
# (onnxruntime-gpu's `cuda` and `cudnn` extras, loaded by service.runtime.load_cuda_libraries), the
# driver from the host through the NVIDIA container toolkit: no CUDA base image to match.
FROM runtime AS gpu
ARG PIP_FIND_LINKS=/wheels
ARG PIP_NO_INDEX=0
# The driver libraries the NVIDIA runtime mounts (CUDA base images set this too); which GPUs, the
# device plugin or `--gpus` decides.
ENV CATDOG_PROVIDERS=cuda NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
USER 0
# The CPU and GPU wheels of onnxruntime install the same module: swap one for the other. The GPU
# wheel trails the CPU one by a release; tests/service/test_cuda.py passed on this one (README, GPU).
COPY deploy/gpu-requirements.txt /tmp/
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip uninstall -y onnxruntime \
    && pip install --find-links "${PIP_FIND_LINKS}" -r /tmp/gpu-requirements.txt \
    && rm /tmp/gpu-requirements.txt
USER 10001:10001

# --- openvino: the runtime image with onnxruntime-openvino, which carries Intel's OpenVINO runtime
# and installs the same module as onnxruntime: swap one for the other, as for the GPU. On a Xeon
# with AMX it ran the int8 models up to 1.75x faster than onnxruntime's own kernels (bare, one
# model at a time), and the server took more memory (README, "OpenVINO": raise the pod's memory limit).
FROM runtime AS openvino
ARG PIP_FIND_LINKS=/wheels
ARG PIP_NO_INDEX=0
ENV CATDOG_PROVIDERS=openvino PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
USER 0
COPY deploy/openvino-requirements.txt /tmp/
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip uninstall -y onnxruntime \
    && pip install --find-links "${PIP_FIND_LINKS}" -r /tmp/openvino-requirements.txt \
    && rm /tmp/openvino-requirements.txt
USER 10001:10001

# Default target: the CPU image.
FROM runtime
