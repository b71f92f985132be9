#!/usr/bin/env bash
# The test command: set up the venv from scratch if needed; check generated code, lint and the layer
# contract; run pytest.
#   scripts/test.sh                 # everything (about 25 minutes on 2 cores)
#   scripts/test.sh -m "not swarm"  # skip the multi-process swarm tests
#   CROWDTRAIN_TEST_WORKERS=2 scripts/test.sh   # the second phase on 2 xdist workers, the swarm tests one
#     after another on one of them (tests/conftest.py): 16.6 min instead of about 25, but beside a swarm
#     a few timing-bound tests miss their bounds (fuzz heartbeat p99, first-message timeout, merge)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/setup_venv.sh
# the dashboard test drives Debian's Chromium (no browser download); install it when missing
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the dashboard test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 ||
      echo "warning: could not install chromium; the dashboard test will be skipped" >&2
  else
    echo "warning: chromium is missing and cannot be installed here; the dashboard test will be skipped" >&2
  fi
fi
# the monitoring test checks docs/alerts.yml and a real /metrics scrape with promtool (Debian's
# prometheus package carries it); install it when missing
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's prometheus (for promtool) for the monitoring test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 ||
      echo "warning: could not install prometheus; the promtool checks will be skipped" >&2
  else
    echo "warning: promtool is missing and cannot be installed here; the promtool checks will be skipped" >&2
  fi
fi
"$PY" scripts/gen_protos.py --check
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/lint-imports" --no-cache # the one-way layers and the light server core (pyproject.toml)
export no_proxy=127.0.0.1,localhost
# two phases (tests/conftest.py): the tests that fork hivemind from pytest's own process, in one plain
# process (a fork inside an xdist worker went wrong); then the rest on two workers, the swarm tests
# one after another on one of them
status=0
CROWDTRAIN_TEST_PHASE=forks "$PY" -m pytest -ra --durations=5 -p no:xdist "$@" || status=$?
[ "$status" = 5 ] && status=0 # 5: no test selected in this phase (e.g. with -k)
CROWDTRAIN_TEST_PHASE=rest "$PY" -m pytest -ra --durations=10 -n "${CROWDTRAIN_TEST_WORKERS:-0}" --dist loadgroup "$@" || {
  rest=$?
  [ "$rest" = 5 ] || status=$rest
}
exit "$status"
