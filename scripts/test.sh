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
echo "[test] pytest"
exec .venv/bin/pytest "$@"
