# syntax=docker/dockerfile:1.7
# Three images from one file: `api` (no torch: small, starts fast), `worker` (torch's CPU build + transformers)
# and `worker-gpu` (torch's CUDA build of the same version).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 modelpress
WORKDIR /srv/modelpress
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
COPY modelpress ./modelpress

FROM base AS api
RUN pip install .
USER modelpress
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
CMD ["modelpress", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS worker
# CPU workers: torch's CPU build of the pinned version (no CUDA libraries: gigabytes smaller). Both worker
# stages install through deploy/install-worker.sh (torch from the given index, then ModelPress's worker extras;
# llama-cpp-python, for GGUF exports measured in llama.cpp, compiles there).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY deploy/install-worker.sh ./deploy/
RUN sh deploy/install-worker.sh "$TORCH_INDEX"
USER modelpress
CMD ["modelpress", "worker", "--queues", "cpu"]

FROM base AS worker-gpu
# GPU workers: the CUDA 12 build of the same torch (pyproject's pin; `==2.13.0` accepts its +cu128 label), from
# PyTorch's cu128 index (TORCH_INDEX picks another CUDA 12 minor). The NVIDIA container runtime mounts the
# driver; the image carries the CUDA runtime inside torch's wheels. The worker refuses to start without a
# visible GPU (`modelpress worker --queues gpu` exits 2), so a missing device reservation shows at once.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY deploy/install-worker.sh ./deploy/
RUN sh deploy/install-worker.sh "$TORCH_INDEX"
USER modelpress
CMD ["modelpress", "worker", "--queues", "gpu"]
