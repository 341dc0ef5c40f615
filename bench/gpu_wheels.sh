#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh may need on a GPU machine without network (bench/gpu_wheels.txt)
# into bench/wheels/: CPython 3.12 on x86-64 Linux, no dependencies resolved (the list is complete).
#   bash bench/gpu_wheels.sh            # then carry bench/wheels with the working tree
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p bench/wheels
grep -v '^#' bench/gpu_wheels.txt | grep -v '^$' | xargs "$PYTHON" -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --dest bench/wheels
du -sh bench/wheels
