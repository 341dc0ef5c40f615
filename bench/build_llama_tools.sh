#!/usr/bin/env bash
# Build llama.cpp's llama-quantize and llama-imatrix (for bench/gguf_bench.py) against the libraries the
# llama-cpp-python wheel installed, from the same llama.cpp sources: two compiler calls, seconds each,
# instead of a second full llama.cpp build. DT_RPATH (not RUNPATH) so that the wheel's libllama-common finds libggml.
#   LLAMA_CPP_SRC: vendor/llama.cpp of the llama-cpp-python sdist (tar -xzf llama_cpp_python-0.3.36.tar.gz)
set -euo pipefail
SRC=${LLAMA_CPP_SRC:-/tmp/lcpsrc/llama_cpp_python-0.3.36/vendor/llama.cpp}
PY=${PYTHON:-.venv/bin/python}
SP=$($PY -c 'import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent.parent)')
OUT=$(pwd)/bench/.cache/llama-tools
mkdir -p "$OUT"
cd "$SRC"
FLAGS="-O2 -std=c++17 -DNDEBUG -I include -I ggml/include -I common -I vendor -I tools/quantize"
LIBS="-L$SP/lib -L$SP/llama_cpp/lib -lllama-common -lllama -lggml -lggml-base -lpthread -Wl,--disable-new-dtags -Wl,-rpath,$SP/lib -Wl,-rpath,$SP/llama_cpp/lib"
nice g++ $FLAGS tools/quantize/quantize.cpp tools/quantize/main.cpp $LIBS -o "$OUT/llama-quantize"
nice g++ $FLAGS tools/imatrix/imatrix.cpp $LIBS -o "$OUT/llama-imatrix"
echo "built $OUT/llama-quantize $OUT/llama-imatrix"
