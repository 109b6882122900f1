#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh) and runs every check: ruff, mypy --strict, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export BRIDGE_TEST_REQUIRE_BROKER=1
echo "[test] ruff"
.venv/bin/ruff check bridge tests bench examples
.venv/bin/ruff format --check bridge tests bench examples
echo "[test] mypy --strict (bridge, tests, bench, examples)"
.venv/bin/mypy
# Most tests wait on sockets rather than compute, so they run in parallel workers; the few that
# change the whole broker (memory alarm, application restart) run afterwards, alone.
echo "[test] pytest, in ${BRIDGE_TEST_WORKERS:-4} workers"
.venv/bin/pytest -n "${BRIDGE_TEST_WORKERS:-4}" -m "not serial" "$@"
echo "[test] pytest, tests that change the whole broker"
status=0
.venv/bin/pytest -m serial "$@" || status=$?
# 5: the arguments selected none of them
[ "$status" -eq 5 ] && status=0
exit "$status"
