#!/usr/bin/env bash
# The test suite: creates/reuses .venv, installs the project, runs pytest. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$SPIN_PY" -m pytest "$@"
