#!/usr/bin/env bash
# Install crowdtrain as a stranger would and run it: build the wheel from this checkout, install it
# into a bare venv (no [dev] extra) with every dependency resolved by pip from the package index,
# torch first and pinned, then run --version, a coordinator, status and a peer from that venv.
#   scripts/install_check.sh                          # torch as in the repository's venv (TORCH_SPEC)
#   TORCH_SPEC='torch==2.13.0' scripts/install_check.sh
# The default test run checks the same wheel in seconds with the repository venv's packages
# (tests/test_install.py); this one takes minutes and the network.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup_venv.sh
export TORCH_SPEC no_proxy=127.0.0.1,localhost
exec "$PY" -m pytest -ra -n 0 -m install tests/test_install.py "$@"
