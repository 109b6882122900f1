"""PostgreSQL fixtures: one throwaway database per session, one fresh schema per test.

Tests that need PostgreSQL fail when it does not answer; they are never skipped, so a green run
always means the PostgreSQL backend was exercised.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from yarl import URL

from tests.state_backends import Backend, PostgresBackend, SqliteBackend

PG_URL = os.environ.get("BRIDGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """URL of a database created for this session (dropped afterwards)."""
    try:
        admin = _admin(PG_URL)
    except psycopg.Error as exc:
        required = os.environ.get("BRIDGE_TEST_REQUIRE_BROKER") == "1"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.fail(
            f"PostgreSQL does not answer at {URL(PG_URL).host}:{URL(PG_URL).port} ({reason}); "
            + ("CI requires it (BRIDGE_TEST_REQUIRE_BROKER=1)" if required else "start it")
            + " -- PostgreSQL tests are never skipped",
            pytrace=False,
        )
    name = f"bridge_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield str(URL(PG_URL).with_path("/" + name))
    finally:
        with _admin(PG_URL) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A URL whose ``search_path`` is a schema of this test's own (dropped afterwards)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with _admin(pg_database) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield str(URL(pg_database).with_query(options=f"-csearch_path={schema}"))
    finally:
        with _admin(pg_database) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def state_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each state test runs on the SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return SqliteBackend(tmp_path / "state.sqlite3")
    return PostgresBackend(request.getfixturevalue("pg_url"))
