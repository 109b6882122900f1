"""The PostgreSQL schema of scaled mode, created and migrated by the bridge itself.

Each entry of ``MIGRATIONS`` runs once, in order, in one transaction that also records the new
version in ``bridge_schema``. Replicas starting together take a transaction-level advisory lock
first, so exactly one of them migrates and the others find the work done. Tables go into the
first schema of the connection's ``search_path`` (``?options=-csearch_path%3Dname`` in the URL
keeps the bridge in a schema of its own).

Columns mirror the SQLite state file; ``seq`` columns keep insertion order where SQLite uses its
``rowid``. ``leases`` and ``replicas`` hold shard ownership (``bridge.scaling.leases``).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg

from bridge.core.errors import StateError

# Any constant works, as long as every replica uses the same one: pg_advisory_xact_lock(bigint).
_MIGRATION_LOCK = 0x62_32_34_62_72_69_64_67  # "b24bridg"

_V1 = """
CREATE TABLE portals (
    member_id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    client_endpoint TEXT NOT NULL,
    server_endpoint TEXT NOT NULL DEFAULT '',
    access_token TEXT NOT NULL DEFAULT '',
    refresh_token TEXT NOT NULL DEFAULT '',
    application_token TEXT NOT NULL DEFAULT '',
    expires_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'active',
    token_version BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE journal (
    member_id TEXT NOT NULL,
    connector TEXT NOT NULL,
    process_id TEXT NOT NULL,
    replay BOOLEAN NOT NULL DEFAULT false,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    seq BIGSERIAL,
    PRIMARY KEY (member_id, connector, process_id)
);
CREATE TABLE confirmed (
    member_id TEXT NOT NULL,
    connector TEXT NOT NULL,
    process_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (member_id, connector, process_id, message_id)
);
CREATE TABLE portal_health (
    member_id TEXT PRIMARY KEY,
    stop_reason TEXT NOT NULL DEFAULT '',
    binding_error TEXT NOT NULL DEFAULT '',
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE parked (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    ref TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload TEXT NOT NULL,
    parked_at DOUBLE PRECISION NOT NULL,
    seq BIGSERIAL,
    PRIMARY KEY (source, key, ref)
);
CREATE TABLE requests (
    member_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    seq BIGSERIAL,
    PRIMARY KEY (member_id, kind)
);
CREATE TABLE cursors (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, key)
);
CREATE TABLE seen (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    seq BIGSERIAL,
    PRIMARY KEY (source, key, id)
);
CREATE INDEX seen_order ON seen (source, key, seq);
CREATE TABLE leases (
    shard INTEGER PRIMARY KEY,
    holder TEXT NOT NULL DEFAULT '',
    epoch BIGINT NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
CREATE TABLE replicas (
    replica_id TEXT PRIMARY KEY,
    shards INTEGER NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"""

MIGRATIONS: tuple[str, ...] = (_V1,)


async def migrate(conn: psycopg.AsyncConnection[object]) -> int:
    """Bring the schema to the newest version; answers the version found before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS bridge_schema (version INTEGER NOT NULL)")
        cur = await conn.execute("SELECT max(version) FROM bridge_schema")
        row = await cur.fetchone()
        found = int(row[0]) if row is not None and row[0] is not None else 0  # type: ignore[index]
        if found > len(MIGRATIONS):
            raise StateError(
                f"the state database has schema version {found}, newer than this bridge "
                f"understands ({len(MIGRATIONS)}); run the newer release"
            )
        for version, script in enumerate(MIGRATIONS[found:], start=found + 1):
            await conn.execute(script)
            await conn.execute("INSERT INTO bridge_schema VALUES (%s)", (version,))
    return found


def redact(url: str) -> str:
    """The URL without its password, for log lines and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def describe(exc: BaseException, url: str) -> str:
    """An error's text with the URL's password taken out, should the driver ever echo it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text
