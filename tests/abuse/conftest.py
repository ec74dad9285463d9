"""The abuse suite reuses the unit tests' database fixtures: tests that ask for
`database` run on SQLite and on a real PostgreSQL server (tests/databases.py)."""

from tests.unit.conftest import database, postgres_server, store_backend

__all__ = ["database", "postgres_server", "store_backend"]
