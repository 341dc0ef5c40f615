#!/usr/bin/env bash
# The prepared GPU check (issue 19): CUDA tests, GPTQ/SparseGPT on the GPU against the CPU, a model larger
# than a GPU memory cap quantized layer by layer, vLLM (where installed) and 2-GPU DDP (where visible).
#
#   bash bench/gpu_check.sh              # a GPU machine: < 8 minutes on one H200
#   bash bench/gpu_check.sh --dry-run    # any CPU machine: the same steps, tiny sizes, 1-2 minutes
#
# Needs Python with torch (a CUDA build for the real run), transformers, safetensors and numba. Whatever
# else the engines and the tests import and this Python lacks is installed offline from bench/wheels/
# (bench/gpu_wheels.sh fills it) into a scratch directory put first on PYTHONPATH; nothing else changes.
# Results: JSON and a markdown block for docs/BENCHMARKS.md on stdout, and gpu_check.{json,md} in $OUT
# when set. Exit status 0 when every check passed, 1 when one did not, 2 when it could not run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/modelpress-gpu-check-site}

# "wheel name|check": the check is Python that fails when the package is missing or unusable.
requirements=(
    "compressed_tensors|import compressed_tensors"
    "loguru|import loguru"
    "pydantic|import pydantic; assert int(pydantic.VERSION.split('.')[0]) >= 2"
    "pydantic_core|import pydantic_core"
    "annotated_types|import annotated_types"
    "typing_inspection|import typing_inspection"
    "psutil|import psutil"
    "pytest|import pytest; assert int(pytest.__version__.split('.')[0]) >= 8"
    "pluggy|import pluggy"
    "iniconfig|import iniconfig"
    "pygments|import pygments"
    "pytest_timeout|import pytest_timeout"
)
for required in torch transformers safetensors numba; do
    if ! "$PYTHON" -c "import $required" 2>/dev/null; then
        echo "gpu_check: $PYTHON cannot import $required, which the machine must provide" >&2
        exit 2
    fi
done
wheels=()
for entry in "${requirements[@]}"; do
    name=${entry%%|*}
    if ! PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "${entry#*|}" 2>/dev/null; then
        found=(bench/wheels/"$name"-*.whl)
        if [[ ! -e "${found[0]}" ]]; then
            echo "gpu_check: $name is missing and bench/wheels/ has no wheel of it (run bench/gpu_wheels.sh)" >&2
            exit 2
        fi
        wheels+=("${found[0]}")
    fi
done
if (( ${#wheels[@]} )); then
    echo "gpu_check: installing into $SITE: ${wheels[*]##*/}" >&2
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}" >&2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/gpu_check.py "$@"
