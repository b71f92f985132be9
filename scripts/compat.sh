#!/usr/bin/env bash
# Load a checkpoint saved by crowdtrain with transformers 4.57 in a venv of its own (built from PyPI
# in a temp dir; skipped when PyPI is unreachable), besides the 5.x of the repository's venv.
#   scripts/compat.sh                              # build the 4.57 venv, then load there
#   CROWDTRAIN_TF4_VENV=/tmp/tf457 scripts/compat.sh  # reuse a venv that has transformers 4.57
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup_venv.sh
exec "$PY" -m pytest -ra -m compat tests/test_hf_compat.py "$@"
