#!/usr/bin/env bash
# Create bench/.venv-llmc: an isolated environment for llm-compressor (the comparison baseline).
#
# llm-compressor pins its own transformers (<= 5.17) and compressed-tensors (0.19), which
# conflict with the service's; it therefore never goes into /work/main/.venv.
# torch is pinned to the CPU wheel in the same pip command: an unpinned torch would pull a
# multi-GB CUDA build. Idempotent: an existing, working venv is left alone.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3.11}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
VENV=.venv-llmc

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import llmcompressor, gguf" 2>/dev/null; then
    echo "bench/$VENV ready ($("$VENV/bin/python" -c 'import llmcompressor; print(llmcompressor.__version__)'))"
    exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet \
    "torch==2.13.0" \
    "llmcompressor==${LLMC_VERSION}" \
    "gguf>=0.10" \
    "psutil>=6" \
    "safetensors>=0.4"
"$VENV/bin/python" -c "import torch, transformers, llmcompressor; print('torch', torch.__version__, 'transformers', transformers.__version__, 'llmcompressor', llmcompressor.__version__)"
