"""Fixtures that run the registry's tests against each database backend.

A test (or fixture) that asks for `database` runs twice: on an SQLite file and on a new
database of a real PostgreSQL server, started once per session (tests/databases.py).
Without PostgreSQL the postgres half is skipped with the reason, except in CI
(CI=true), where a missing server is a failure: a skip there would hide a broken setup.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.databases import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[postgres]')")
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        _unavailable(str(exc))
    yield server
    server.stop()


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL backend tests cannot run in CI: {why}", pytrace=False)
    pytest.skip(f"PostgreSQL backend not tested: {why}")


@pytest.fixture(params=["sqlite", "postgres"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database(store_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str | Path:
    """The registry database of one test: an SQLite file (Path) or a PostgreSQL URL."""
    if store_backend == "sqlite":
        return tmp_path / "home" / "registry.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()
