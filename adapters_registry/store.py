"""Persistence of the registry: SQLite by default, PostgreSQL for shared deployments.

Every write is one transaction, committed durably before the call returns: once the API
has acknowledged a change, neither a restart nor a kill -9 loses it.

`Store` is the one object the registry holds: it opens the database, brings its tables
up to date (schema.py), and answers through one query class per part (tables.py).
Why not SQLAlchemy: six small tables and a dozen statements, and SQLite must keep
working with the stdlib alone.
"""

from __future__ import annotations

from pathlib import Path

from adapters_registry.database import Database, open_database
from adapters_registry.schema import SCHEMA_VERSION, migrate
from adapters_registry.tables import AdapterTables, AliasTables, TenantTables

# SCHEMA_VERSION: where callers found it before schema.py owned it.
__all__ = ["SCHEMA_VERSION", "Store"]


class Store:
    def __init__(self, target: str | Path | Database) -> None:
        """`target`: an SQLite file (Path), a database URL, or an open Database."""
        self._db = target if isinstance(target, Database) else open_database(target)
        migrate(self._db)
        adapters = AdapterTables(self._db)
        self.add_version = adapters.add_version
        self.get = adapters.get
        self.list_adapters = adapters.list_adapters
        self.set_current = adapters.set_current
        self.set_access = adapters.set_access
        self.set_pinned = adapters.set_pinned
        self.delete_version = adapters.delete_version
        self.delete_adapter = adapters.delete_adapter
        aliases = AliasTables(self._db)
        self.put_alias = aliases.put_alias
        self.get_alias = aliases.get_alias
        self.list_aliases = aliases.list_aliases
        self.delete_alias = aliases.delete_alias
        tenants = TenantTables(self._db)
        self.put_tenant = tenants.put_tenant
        self.tenant = tenants.tenant
        self.tenants = tenants.tenants
        self.delete_tenant = tenants.delete_tenant
        self.add_key = tenants.add_key
        self.delete_key = tenants.delete_key
        self.list_keys = tenants.list_keys

    @property
    def database(self) -> Database:
        return self._db

    def generation(self) -> int:
        """A counter every committed change increments (tables.Tables._write): replicas
        compare it to notice each other's writes without reading everything."""
        with self._db.read() as db:
            row = db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        self._db.close()
