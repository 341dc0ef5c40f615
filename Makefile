# ModelPress — the two commands a fresh machine needs: `make dev` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: dev test test-fast install lint typecheck bench clean

# llama.cpp (the `gguf` extra: GGUF exports measured in the runtime that serves them) builds from source at
# install: the library alone, portable AVX2 (these machines change CPU between sessions), no tools or examples.
# pip's wheel cache keeps the build, so only the first install pays for it (22 min on 2 loaded cores).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DGGML_OPENMP=ON -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF

$(BIN)/modelpress: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build this project is developed and tested with.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install --quiet -e ".[worker,gguf,observability,dev]"
	@touch $@

install: $(BIN)/modelpress

## Run the API and a worker in embedded mode (SQLite, local storage, file broker): no servers needed.
dev: install
	PORT=$(PORT) $(BIN)/modelpress dev

## The whole test suite: unit, API (Postgres, Redis, S3 server) and end-to-end (real worker processes).
test: install
	$(BIN)/pytest

## The fast tier while you work: unit and API tests (Postgres, Redis, S3 server), no e2e stack, no slow test.
test-fast: install
	$(BIN)/pytest -m "not e2e and not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy app workers && $(BIN)/mypy --strict modelpress

## Benchmarks against llm-compressor on SmolLM2-135M (needs PyPI access; ~1 h on 2 CPU cores).
bench: install
	bash bench/run_all.sh

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
