#!/usr/bin/env bash
# Create (or reuse) the repository's virtual environment and install crowdtrain with its dev extra.
# Sourced by scripts/demo.sh and scripts/test.sh; sets $VENV and $PY.
#   CROWDTRAIN_VENV=...   where the venv lives (default: .venv in the repository)
#   PYTHON=python3.11     which interpreter creates it
#   TORCH_SPEC=...        the torch requirement (default torch==2.13.0: a CPU build is on disk on our
#                         CI machines, while a bare `torch` would pull gigabytes of CUDA wheels)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CROWDTRAIN_VENV:-$ROOT/.venv}
PY="$VENV/bin/python"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$PY" ]; then
  echo "creating virtual environment in $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# reinstall only when what we install changed
stamp="$VENV/.crowdtrain-installed"
want=$( (cat "$ROOT/pyproject.toml"; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing crowdtrain and its dependencies into $VENV (first run takes a few minutes)"
  "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # torch first and pinned, so nothing below can pull a different (CUDA) build
  "$PY" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -m pip install -q -e "$ROOT[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import torch, hivemind, transformers, grpc, crowdtrain.coordinator.cli" || {
    echo "error: installation failed; see the pip output above" >&2
    exit 1
  }
  echo "$want" > "$stamp"
fi
