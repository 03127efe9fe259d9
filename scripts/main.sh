#!/usr/bin/env bash
# The main job on an embedded default: creates/reuses .venv, installs the project, then runs
# the tiny CPU SPIN demo (or whatever `spin-kernels demo` is given as extra args).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$VENV/bin/spin-kernels" demo "$@"
