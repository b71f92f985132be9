#!/usr/bin/env bash
# The test command: set up the venv from scratch if needed, check generated code and lint, run pytest.
#   scripts/test.sh                 # everything (about 5 minutes on 2 cores)
#   scripts/test.sh -m "not swarm"  # skip the multi-process swarm tests
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup_venv.sh
"$PY" scripts/gen_protos.py --check
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
export no_proxy=127.0.0.1,localhost
exec "$PY" -m pytest -ra --durations=10 "$@"
