#!/usr/bin/env bash
# What a session with a lent CUDA GPU runs, in one command of about 9 minutes: the CUDA tests of
# the Triton kernels, then the GPU benchmark suites (run_gpu.sh). Everything lands in OUT_DIR:
# run_gpu.log (tests + benchmarks) and <gpu-slug>/{kernels,e2e}.{json,md,png}, kernels-sweep.png
# (8 files at most, checked at the end: what the device tool brings back).
#
#   bash benchmarks/fetch_gpu_wheels.sh               # once, where a registry is reachable: baselines' wheels
#   bash benchmarks/gpu_session.sh OUT_DIR            # on the GPU machine (offline is fine)
#   bash benchmarks/gpu_session.sh --dry-run OUT_DIR  # here, on CPU, first (~3 min on 2 cores)
#
# --dry-run takes the same paths on the CPU (benchmarks/dryrun.py): the test invocation collects
# the same tests (their CPU parts run in CI; their CUDA parts cannot run here), the suites run the
# CUDA plan at miniature sizes with Triton interpreted, the tables, plots and the layout of
# OUT_DIR are written and checked; nothing of it is a measurement.
#
# Environment: SPIN_GPU_TEST_TIMEOUT_S (default 150), SPIN_BENCH_KERNEL_BUDGET_S (default 270
# here), SPIN_BENCH_E2E_BUDGET_S (60); the rest as in run_gpu.sh. Exit status: non-zero when the
# tests, a suite or the layout check failed.
set -uo pipefail
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
OUT="${1:?usage: bash benchmarks/gpu_session.sh [--dry-run] OUT_DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -z "${SPIN_BENCH_WHEELS:-}" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  export SPIN_BENCH_WHEELS="$ROOT/.whl"
fi
cd "$ROOT"
(
  echo "== gpu_session.sh $DRY $(date -u +%FT%TZ): CUDA tests of the Triton kernels"
  # First autotune candidate only: the tests check results, and compile far fewer variants.
  SPIN_KERNELS_AUTOTUNE=0 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" timeout "${SPIN_GPU_TEST_TIMEOUT_S:-150}" \
    "$PY" -m pytest -q -p no:cacheprovider ${DRY:+--collect-only} tests/test_triton_kernels.py tests/test_padded_rows.py
  rc=$?
  echo "== tests rc=$rc"
  exit $rc
) 2>&1 | tee "$OUT/run_gpu.log"
tests_rc=${PIPESTATUS[0]}
SPIN_BENCH_KERNEL_BUDGET_S="${SPIN_BENCH_KERNEL_BUDGET_S:-270}" SPIN_GPU_LOG_APPEND=1 bash benchmarks/run_gpu.sh $DRY "$OUT"
bench_rc=$?
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m benchmarks check-out "$OUT" 2>&1 | tee -a "$OUT/run_gpu.log"
layout_rc=${PIPESTATUS[0]}
echo "== gpu_session.sh done: tests rc=$tests_rc, benchmarks rc=$bench_rc, layout rc=$layout_rc" | tee -a "$OUT/run_gpu.log"
exit $(( tests_rc | bench_rc | layout_rc ))
