#!/usr/bin/env bash
# What a session with a lent CUDA GPU runs, in one command of about 9 minutes: the CUDA tests of
# the Triton kernels, then the GPU benchmark suites (run_gpu.sh). Everything lands in OUT_DIR:
# run_gpu.log (tests + benchmarks) and <gpu-slug>/{kernels,e2e}.{json,md,png}, kernels-sweep.png
# (8 files at most).
#
#   bash benchmarks/fetch_gpu_wheels.sh     # once, where a registry is reachable: baselines' wheels
#   bash benchmarks/gpu_session.sh OUT_DIR  # on the GPU machine (offline is fine)
#
# Environment: SPIN_GPU_TEST_TIMEOUT_S (default 150), SPIN_BENCH_KERNEL_BUDGET_S (default 270
# here), SPIN_BENCH_E2E_BUDGET_S (60); the rest as in run_gpu.sh.
set -uo pipefail
OUT="${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -z "${SPIN_BENCH_WHEELS:-}" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  export SPIN_BENCH_WHEELS="$ROOT/.whl"
fi
cd "$ROOT"
{
  echo "== gpu_session.sh $(date -u +%FT%TZ): CUDA tests of the Triton kernels"
  # First autotune candidate only: the tests check results, and compile far fewer variants.
  SPIN_KERNELS_AUTOTUNE=0 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout "${SPIN_GPU_TEST_TIMEOUT_S:-150}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_padded_rows.py
  echo "== tests rc=$?"
} 2>&1 | tee "$OUT/run_gpu.log"
SPIN_BENCH_KERNEL_BUDGET_S="${SPIN_BENCH_KERNEL_BUDGET_S:-270}" SPIN_GPU_LOG_APPEND=1 bash benchmarks/run_gpu.sh "$OUT"
