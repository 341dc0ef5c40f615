# syntax=docker/dockerfile:1.7
# Two images from one file: `api` (no torch: small, starts fast) and `worker` (torch + transformers).

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
# torch==2.13.0 from PyPI is the CUDA build on Linux: the same image serves GPU and CPU workers.
# llama-cpp-python (GGUF exports measured in llama.cpp) compiles at install: the library alone, portable AVX2.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF \
       -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
       pip install ".[worker,gguf]" \
    && apt-get purge -y build-essential cmake && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
USER modelpress
CMD ["modelpress", "worker", "--queues", "cpu"]
