#!/usr/bin/env bash
# One command for the whole quantization/pruning benchmark (issues 3 and 8):
#   setup (.venv-llmc) -> reference model -> corpus -> llm-compressor side -> ModelPress side
#   -> FLOP floor -> docs/bench/quant_prune.md
# Run from anywhere: bash bench/run_all.sh [--fresh]
#   --fresh   move old result lines aside first (otherwise the latest line per recipe wins)
# Environment: BENCH_THREADS (default 2), BENCH_EVAL_TOKENS (default 2048).
# Heavy steps run one process at a time; expect ~1 h on 2 quiet cores.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVICE_PY=.venv/bin/python
LLMC_PY=bench/.venv-llmc/bin/python

if [[ "${1:-}" == "--fresh" ]] && compgen -G "bench/results/*.jsonl" >/dev/null; then
    stamp=$(date +%Y%m%dT%H%M%S)
    mkdir -p "bench/results/old/$stamp"
    mv bench/results/*.jsonl "bench/results/old/$stamp/"
fi

bash bench/setup_llmcompressor.sh
"$LLMC_PY" -m bench.reference_model      # needs gguf: lives in .venv-llmc, not the service venv
"$SERVICE_PY" -m bench.corpus
"$LLMC_PY" -m bench.run_llmcompressor
"$SERVICE_PY" -m bench.run_modelpress
"$SERVICE_PY" -m bench.flops
"$SERVICE_PY" -m bench.report
