#!/usr/bin/env bash
# Prepares a Debian/Ubuntu machine for the bridge: Python 3.11+ with venv, the project in
# ./.venv, promtool, and a running RabbitMQ on 127.0.0.1:5672. Safe to run again; fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
apt_updated=""
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found; install $* by hand"
    if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

python_ok() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
PYTHON="${PYTHON:-python3}"
if ! python_ok "$PYTHON"; then
    say "installing python3 and python3-venv"
    apt_install python3 python3-venv python3-pip
    PYTHON=python3
    python_ok "$PYTHON" || die "Python 3.11 or newer with venv is required"
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
fi
extra="${BRIDGE_SETUP_EXTRAS:-dev}"
say "installing the project (.[${extra}])"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[${extra}]"

# The AsyncAPI document is checked with the official parser (@asyncapi/parser), run by Node.js.
if [ "$extra" = dev ] && ! command -v npm >/dev/null; then
    say "installing nodejs and npm"
    apt_install nodejs npm
fi
# The emulator's PHP-compatible parsing is checked against a real PHP's answers.
if [ "$extra" = dev ] && ! command -v php >/dev/null; then
    say "installing php-cli"
    apt_install php-cli
fi

# promtool (Debian's prometheus package) unit-tests the chart's alert rules. Only the binary is
# taken, into .venv/bin: installing the package would also set up a Prometheus server.
if ! command -v promtool >/dev/null && [ ! -x .venv/bin/promtool ]; then
    command -v apt-get >/dev/null || die "apt-get not found; install promtool by hand"
    say "installing promtool into .venv/bin (from Debian's prometheus package)"
    if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    debs="$(mktemp -d)"
    (cd "$debs" && apt-get download -qq prometheus >/dev/null 2>&1) \
        || die "cannot download Debian's prometheus package (for promtool)"
    dpkg-deb -x "$debs"/prometheus_*.deb "$debs/root"
    install -m 0755 "$debs/root/usr/bin/promtool" .venv/bin/promtool
    rm -rf "$debs"
fi

broker_up() {
    .venv/bin/python - <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

if ! broker_up; then
    if ! command -v rabbitmq-server >/dev/null; then
        say "installing rabbitmq-server"
        apt_install rabbitmq-server
    fi
    say "starting RabbitMQ"
    $SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
fi
for _ in $(seq 1 90); do
    if broker_up && { ! command -v rabbitmqctl >/dev/null || $SUDO rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; }; then
        say "RabbitMQ is answering on 127.0.0.1:5672"
        exit 0
    fi
    sleep 1
done
die "RabbitMQ did not answer on 127.0.0.1:5672 within 90 s (try: rabbitmq-server -detached)"
