#!/usr/bin/env bash
# Fetches, on a machine with a package registry, the baselines' wheels for an offline GPU machine
# (Python 3.12 there): Liger, CCE, TRL, and what TRL needs beyond a CUDA image with torch,
# transformers, accelerate, pandas and pyarrow. All pure Python (~10 MiB).
#
#   bash benchmarks/fetch_gpu_wheels.sh [DIR]        # DIR defaults to .whl (git-ignored)
#
# benchmarks/gpu_session.sh and run_gpu.sh pick them up from .whl/ (or SPIN_BENCH_WHEELS).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${SPIN_GPU_PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DIR" \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill multiprocess
ls -la "$DIR"
