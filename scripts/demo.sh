#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh) and runs the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
BRIDGE_SETUP_EXTRAS="${BRIDGE_SETUP_EXTRAS:-dev}" ./scripts/setup.sh
exec .venv/bin/bitrix24-bridge demo "$@"
