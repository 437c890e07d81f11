#!/usr/bin/env bash
# The test suite, as README and CI run it: set up the venv, then pytest on CPU.
#   bash scripts/test.sh                      # everything under tests/
#   bash scripts/test.sh tests/test_foo.py -k bar
# Every test runs (no -x); each is killed after MEGATRON_RL_TEST_TIMEOUT seconds (default 900);
# the 15 slowest are listed at the end.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEGATRON_RL_VENV:-$repo/.venv}"
bash "$repo/scripts/venv.sh"
cd "$repo"
[ $# -gt 0 ] || set -- tests
exec "$venv/bin/python" -m pytest -q -rfEs \
  --timeout="${MEGATRON_RL_TEST_TIMEOUT:-900}" --durations=15 --durations-min=1.0 "$@"
