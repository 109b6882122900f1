# syntax=docker/dockerfile:1

# Exact patch version: a rebuild must not silently change the interpreter. Bump it on purpose.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- builder: a wheel of the project, installed with its dependencies into a venv -------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
RUN python -m venv /opt/venv

# The dependencies exactly as locked (scripts/lock.sh), every file checked against its hash:
# a rebuild cannot pick up another release, or a tampered one. Their own layer, so a code
# change does not reinstall them. Every one ships a manylinux wheel: no compiler, no apt.
COPY requirements.txt ./
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary :all: \
    -r requirements.txt

# Only what the wheel is built from, so edits to tests or the chart don't invalidate this layer.
COPY pyproject.toml README.md ./
COPY bridge ./bridge

# The project itself without dependencies (all locked above); pip check fails the build if the
# lock no longer satisfies pyproject.toml. pip compiles the bytecode here, because the running
# container cannot write it.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && /opt/venv/bin/pip check

# --- runtime: the interpreter, the venv and nothing else -------------------------------------
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="bitrix24-bridge" \
      org.opencontainers.image.description="Moves Bitrix24 offline events into RabbitMQ without losing one" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.13-slim-bookworm"

# The root filesystem is read-only in the cluster: no bytecode writes, unbuffered logs, and the
# state file on the volume below.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRIDGE_HTTP_HOST=0.0.0.0 \
    BRIDGE_HTTP_PORT=8080 \
    BRIDGE_STATE_PATH=/var/lib/bitrix24-bridge/state.sqlite3

# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it and fsGroup matches.
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin bridge \
    && mkdir -p /var/lib/bitrix24-bridge \
    && chown 10001:10001 /var/lib/bitrix24-bridge

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/bitrix24-bridge
VOLUME ["/var/lib/bitrix24-bridge"]
EXPOSE 8080

# For plain `docker run`; Kubernetes uses its own probes. The slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BRIDGE_HTTP_PORT', '8080') + '/livez', timeout=4)"]

# Exec form: the bridge is PID 1 and gets SIGTERM itself, so it can finish the in-flight page.
ENTRYPOINT ["bitrix24-bridge"]
CMD ["serve"]
