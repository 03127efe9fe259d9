#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install what the project needs.
# Sourced by scripts/main.sh and scripts/test.sh; safe to run again (it only reinstalls when
# setup.py or csrc/ changed). Set SPIN_VENV to use another folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPIN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi
# torch first: a CPU machine takes the pinned CPU wheel (never a multi-GB CUDA build); a machine
# that already has torch (a GPU box) keeps its own.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
STAMP="$VENV/.spin_kernels_stamp"
WANT="$( (cat "$ROOT/setup.py"; cat "$ROOT"/csrc/* 2>/dev/null || true) | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$PY" -c "import spin_kernels" 2>/dev/null; then
  (cd "$ROOT" && "$PY" -m pip install -q --no-build-isolation -e ".[dev,bench]")
  echo "$WANT" > "$STAMP"
fi
export SPIN_PY="$PY"
