#!/usr/bin/env bash
# Regenerates requirements.txt, the hash-locked runtime dependencies the image installs, from
# pyproject.toml with uv (a dev dependency). Existing pins are kept unless pyproject.toml needs
# others; pass --upgrade to move every pin to the newest allowed release. Commit both files.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/uv pip compile pyproject.toml \
    --generate-hashes --universal --python-version 3.11 \
    --custom-compile-command "./scripts/lock.sh" --quiet \
    --output-file requirements.txt "$@"
