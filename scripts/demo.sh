#!/usr/bin/env bash
# Set up the venv if needed, then run a local swarm: a coordinator and two peers train a tiny
# transformer on 127.0.0.1, publish a checkpoint, pull it and print a generated sample.
#   scripts/demo.sh                       # 2 peers, 4 minutes
#   scripts/demo.sh --peers 3 --minutes 2
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup_venv.sh
export no_proxy=127.0.0.1,localhost
exec "$VENV/bin/crowdtrain" demo "$@"
