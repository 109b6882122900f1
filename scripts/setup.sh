#!/usr/bin/env bash
# Prepares a Debian/Ubuntu machine for the bridge: Python 3.11+ with venv, the project in
# ./.venv, promtool, a running RabbitMQ on 127.0.0.1:5672 and, for the tests, PostgreSQL on
# 127.0.0.1:5432. Safe to run again; fails loudly.
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

# The PostgreSQL state backend is tested against a real server (user postgres, no password, on
# loopback), unless BRIDGE_TEST_PG_URL names another one.
pg_answers() {
    .venv/bin/python - "$1" <<'PY'
import sys
import psycopg
try:
    psycopg.connect(sys.argv[1], connect_timeout=2).close()
except psycopg.OperationalError as exc:
    print(str(exc).strip().splitlines()[-1] if str(exc).strip() else "no answer", file=sys.stderr)
    sys.exit(1)
PY
}
pg_listening() {
    .venv/bin/python -c 'import socket; socket.create_connection(("127.0.0.1", 5432), timeout=1).close()' 2>/dev/null
}
if [ "$extra" = dev ] && [ -z "${BRIDGE_TEST_PG_URL:-}" ]; then
    PG_URL="postgresql://postgres@127.0.0.1:5432/postgres"
    installed_pg=""
    if ! pg_listening; then
        if ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
            say "installing postgresql"
            apt_install postgresql
            installed_pg=1
        fi
        version="$(ls /etc/postgresql | sort -V | tail -n 1)"
        say "starting PostgreSQL $version"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
        for _ in $(seq 1 60); do pg_listening && break; sleep 1; done
        pg_listening || die "PostgreSQL did not answer on 127.0.0.1:5432 within 60 s (try: pg_ctlcluster --skip-systemctl-redirect $version main start)"
    fi
    if ! pg_answers "$PG_URL" 2>/dev/null && [ -n "$installed_pg" ]; then
        # A cluster installed just now: let the tests' user in over loopback, nothing else.
        hba="/etc/postgresql/$version/main/pg_hba.conf"
        $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload >/dev/null
        for _ in $(seq 1 30); do pg_answers "$PG_URL" 2>/dev/null && break; sleep 1; done
    fi
    if ! reason="$(pg_answers "$PG_URL" 2>&1)"; then
        die "PostgreSQL on 127.0.0.1:5432 refuses $PG_URL ($reason); allow user postgres over loopback or set BRIDGE_TEST_PG_URL"
    fi
    say "PostgreSQL is answering on 127.0.0.1:5432"
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
