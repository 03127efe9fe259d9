#!/usr/bin/env bash
# The model tests under the transformers versions that matter: the lowest one setup.py admits
# and the lent GPU machine's (transformers 5.17.0 beside Triton 3.6.0). One virtual environment
# per version, created on the first run and reused, each with the CPU torch wheel and what the
# tests need; the project runs from this checkout (PYTHONPATH: no install, no C++ build; the model
# tests use impl="torch").
#
#   bash scripts/test_transformers_versions.sh                  # lowest admitted + the GPU machine's
#   bash scripts/test_transformers_versions.sh 4.57.6 5.24.0    # these transformers versions instead
#
# Environment: SPIN_VERSIONS_VENVS (the venvs' folder, default .venvs/ here, git-ignored), PYTHON
# (the interpreter the venvs are made from, default python3), SPIN_TORCH (default torch==2.13.0),
# SPIN_VERSIONS_TESTS (default tests/test_models_packed.py). Exit status: non-zero when any
# version fails (or cannot be installed).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="${SPIN_VERSIONS_VENVS:-$ROOT/.venvs}"
PY="${PYTHON:-python3}"
TORCH="${SPIN_TORCH:-torch==2.13.0}"
read -r -a TESTS <<< "${SPIN_VERSIONS_TESTS:-tests/test_models_packed.py}"
# Each entry: the pip requirements that differ from one version to the next.
LOWEST="$(sed -n 's/.*"transformers>=\([0-9][0-9.]*\)".*/\1/p' "$ROOT/setup.py")"
if [ -z "$LOWEST" ]; then
  echo "setup.py: no \"transformers>=X\" requirement found" >&2
  exit 2
fi
if [ $# -gt 0 ]; then
  ENTRIES=()
  for v in "$@"; do ENTRIES+=("transformers==$v"); done
else
  ENTRIES=("transformers==$LOWEST" "transformers==5.17.0 triton==3.6.0")
fi
mkdir -p "$VENVS"
summary=()
status=0
for entry in "${ENTRIES[@]}"; do
  read -r -a reqs <<< "$entry"
  name="$(echo "$entry" | sed 's/==/-/g; s/ /_/g' | tr -cd 'A-Za-z0-9._-')"
  venv="$VENVS/$name"
  echo "== $entry ($venv)"
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv" || { summary+=("$entry: venv not created"); status=1; continue; }
  fi
  # One resolver call, so that transformers' own pins (huggingface-hub, tokenizers) hold.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$TORCH" "${reqs[@]}" pytest pytest-benchmark \
      hypothesis safetensors tokenizers pyyaml tqdm numpy peft > "$venv/pip.log" 2>&1 \
    || { summary+=("$entry: pip install failed (see $venv/pip.log)"); status=1; continue; }
  versions="$("$venv/bin/python" -c '
import importlib.util, torch, transformers
triton = importlib.util.find_spec("triton") and __import__("triton").__version__
print("transformers", transformers.__version__, "torch", torch.__version__, "triton", triton or "none")' 2>&1)" \
    || { summary+=("$entry: not importable: $versions"); status=1; continue; }
  (cd "$ROOT" && PYTHONPATH="$ROOT" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}") \
    | tee "$venv/last-run.log" | tail -n 15
  rc=${PIPESTATUS[0]}
  result="$(grep -E '[0-9]+ (passed|failed)' "$venv/last-run.log" | tail -n 1)"
  summary+=("$versions: ${result:-no result} (rc=$rc)")
  [ "$rc" -eq 0 ] || status=1
done
echo "== summary (${TESTS[*]})"
printf '%s\n' "${summary[@]}"
exit $status
