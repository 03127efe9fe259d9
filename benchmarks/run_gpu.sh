#!/usr/bin/env bash
# The GPU benchmark suites in one command, offline, in about 10 minutes on one A100/H100:
#
#   bash benchmarks/run_gpu.sh OUT_DIR
#   bash benchmarks/run_gpu.sh --dry-run OUT_DIR   # the same on CPU at miniature sizes (benchmarks/dryrun.py)
#
# Writes OUT_DIR/<gpu-slug>/{kernels,e2e}.{json,md,png} (+ kernels-sweep.png) and OUT_DIR/run_gpu.log.
# Uses the machine's own python3/torch/triton/transformers (nothing is downloaded) and runs from
# this checkout (PYTHONPATH), so no install is needed. Baselines that do not import (Liger,
# CCE, TRL) are skipped with a note in the tables. To include them on an offline machine, put
# their wheels (pure Python: liger-kernel, cut-cross-entropy, trl) in a folder and set
# SPIN_BENCH_WHEELS=that/folder: they are installed with --no-deps into a private folder.
#
# Environment: PYTHON (default python3), SPIN_GPU_LOG_APPEND=1 (append to run_gpu.log), SPIN_BENCH_KERNEL_BUDGET_S (default 390: no new kernel
# group starts after this), SPIN_BENCH_E2E_BUDGET_S (default 60), SPIN_BENCH_ARGS (extra
# arguments for the kernel suite, e.g. "--quick").
set -uo pipefail
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
OUT="${1:?usage: bash benchmarks/run_gpu.sh [--dry-run] OUT_DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/run_gpu.log"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${SPIN_BENCH_WHEELS:-}" ]; then
  SITE="$(mktemp -d)/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$SPIN_BENCH_WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$SITE"
fi
cd "$ROOT"
{
  echo "== run_gpu.sh $DRY $(date -u +%FT%TZ) in $ROOT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')"
  "$PY" -m benchmarks run --suite kernels --device cuda $DRY --out "$OUT" \
    --budget-s "${SPIN_BENCH_KERNEL_BUDGET_S:-390}" ${SPIN_BENCH_ARGS:-}
  k=$?
  "$PY" -m benchmarks run --suite e2e --device cuda $DRY --out "$OUT" --e2e-budget-s "${SPIN_BENCH_E2E_BUDGET_S:-60}"
  e=$?
  echo "== done $(date -u +%FT%TZ): kernels rc=$k, e2e rc=$e"
  exit $(( k | e ))
} 2>&1 | tee ${SPIN_GPU_LOG_APPEND:+-a} "$LOG"
exit "${PIPESTATUS[0]}"
