#!/bin/sh
# Installs a worker image's dependencies: torch (the pyproject pin) from the index given as $1 (the CPU or a
# CUDA build), then ModelPress with its worker and gguf extras. llama-cpp-python compiles at install: the
# library alone, portable AVX2. The compilers are removed afterwards.
set -eu
torch_index="$1"
apt-get update
apt-get install -y --no-install-recommends build-essential cmake
pip install --index-url "$torch_index" "torch==2.13.0"
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
    pip install ".[worker,gguf]"
apt-get purge -y build-essential cmake
apt-get autoremove -y
rm -rf /var/lib/apt/lists/*
