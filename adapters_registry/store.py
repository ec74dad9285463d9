"""Persistence of the registry: SQLite by default, PostgreSQL for shared deployments.

Every write is one transaction, committed durably before the call returns: once the API
has acknowledged a change, neither a restart nor a kill -9 loses it. Version numbers are
per adapter, increasing, and never reused, even after a delete, so `pirate@3` always names
the same weights, also when several replicas write to one PostgreSQL database.

The SQL here is written once for both databases; database.py holds what differs
(placeholders, transactions, the write lock, driver errors). Why not SQLAlchemy: six small
tables and a dozen statements, and SQLite must keep working with the stdlib alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters_registry.database import Connection, Database, open_database
from adapters_registry.errors import (
    AdapterNotFound,
    AlreadyExists,
    InUse,
    InvalidAlias,
    TenantNotFound,
)
from adapters_registry.experiments import MIGRATION as EXPERIMENTS_MIGRATION
from adapters_registry.experiments import SHADOW_MIGRATION
from adapters_registry.records import (
    AdapterRecord,
    AliasRecord,
    KeyRecord,
    ServingDefaults,
    TenantRecord,
    Variant,
    VersionRecord,
)
from adapters_registry.spec import AdapterSpec

SCHEMA_VERSION = 6
# BIGINT and DOUBLE PRECISION, not INTEGER and REAL: the same affinities in SQLite, while
# PostgreSQL's INTEGER is 32-bit (sizes, quotas) and REAL a 32-bit float (timestamps
# to ~2 minutes).
# Databases created before keep their declared types; SQLite stores the same either way.
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """
    CREATE TABLE IF NOT EXISTS adapters (
        name TEXT PRIMARY KEY,
        current_version BIGINT,
        next_version BIGINT NOT NULL DEFAULT 1,
        pinned INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS versions (
        adapter TEXT NOT NULL REFERENCES adapters(name) ON DELETE CASCADE,
        version BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes BIGINT NOT NULL,
        rank INTEGER NOT NULL,
        alpha DOUBLE PRECISION NOT NULL,
        target_modules TEXT NOT NULL,
        base_model TEXT NOT NULL,
        source TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (adapter, version)
    )""",
    """
    CREATE TABLE IF NOT EXISTS aliases (
        name TEXT PRIMARY KEY,
        variants TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS tenants (
        name TEXT PRIMARY KEY,
        max_concurrent BIGINT,
        tokens_per_minute BIGINT,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """
    CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
        secret_sha256 TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
)

# Schema upgrades, applied in order to databases created by older versions. Each runs once
# (the meta table records the version), inside one transaction with the version bump.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (
        "ALTER TABLE adapters ADD COLUMN owner TEXT",
        "ALTER TABLE adapters ADD COLUMN shared INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE aliases ADD COLUMN owner TEXT",
        "ALTER TABLE aliases ADD COLUMN shared INTEGER NOT NULL DEFAULT 0",
    ),
    3: (
        # The next version number of every name ever registered: a tombstone that
        # outlives the adapter's row, so a deleted and re-created adapter continues its
        # numbering and `name@N` never names two contents (review H3). Seeded from the
        # adapters that exist; numbers of adapters deleted before this upgrade are lost.
        "CREATE TABLE IF NOT EXISTS version_numbers "
        "(name TEXT PRIMARY KEY, next_version BIGINT NOT NULL)",
        "INSERT INTO version_numbers (name, next_version) "
        "SELECT name, next_version FROM adapters WHERE true",
        # Digest of the adapter config fields that change the math (validate.py):
        # NULL for versions registered before, whose config was not pinned.
        "ALTER TABLE versions ADD COLUMN config_sha256 TEXT",
        # Registered by folder discovery (follows its folder of the adapters directory):
        # 1/0; NULL for adapters registered before, for which the router infers it.
        "ALTER TABLE adapters ADD COLUMN discovered INTEGER",
    ),
    # A/B experiments: the exposure log, feedback, guardrails (adapters_registry/experiments.py).
    4: EXPERIMENTS_MIGRATION,
    # A version's serving defaults (records.ServingDefaults), a JSON object; NULL: none
    # (every version registered before).
    5: ("ALTER TABLE versions ADD COLUMN defaults TEXT",),
    # Shadow traffic: an alias's shadow adapter and its runs (adapters_registry/experiments.py).
    6: SHADOW_MIGRATION,
}


class Store:
    def __init__(self, target: str | Path | Database) -> None:
        """`target`: an SQLite file (Path), a database URL, or an open Database."""
        self._db = target if isinstance(target, Database) else open_database(target)
        # Schema and migrations in one write transaction: replicas starting together on
        # one PostgreSQL database take turns (DDL is transactional on both databases).
        with self._db.write() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(
                "INSERT INTO meta VALUES ('schema_version', '1') ON CONFLICT (key) DO NOTHING"
            )
            (current,) = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            for version in sorted(v for v in _MIGRATIONS if v > int(current)):
                for statement in _MIGRATIONS[version]:
                    db.execute(statement)
                db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))

    @property
    def database(self) -> Database:
        return self._db

    def generation(self) -> int:
        """A counter every committed change increments: replicas compare it to notice
        each other's writes without reading everything."""
        with self._db.read() as db:
            row = db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return 0 if row is None else int(row[0])

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._db.write() as db:
            yield db
            # Reached only when the change succeeded; commits with it.
            db.execute(
                "INSERT INTO meta VALUES ('generation', '1') ON CONFLICT (key) DO UPDATE "
                "SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT)"
            )

    def close(self) -> None:
        self._db.close()

    # -- adapters and versions ---------------------------------------------------------

    def add_version(
        self,
        spec: AdapterSpec,
        *,
        source: str,
        path: str,
        create: bool,
        make_current: bool,
        owner: str | None = None,
        shared: bool = False,
        discovered: bool = False,
        defaults: ServingDefaults | None = None,
    ) -> VersionRecord:
        """Record a validated version, with its serving `defaults`; `create` registers
        the adapter itself too (`discovered`: by folder discovery, so that it follows its
        folder)."""
        now = time.time()
        with self._write() as db:
            exists = db.execute(
                "SELECT next_version FROM adapters WHERE name=?", (spec.name,)
            ).fetchone()
            if create:
                if exists is not None:
                    raise AlreadyExists(
                        f"adapter {spec.name!r} already exists; add a version to it instead",
                        adapter=spec.name,
                    )
                if _alias_row(db, spec.name) is not None:
                    raise AlreadyExists(f"{spec.name!r} is already an alias", adapter=spec.name)
                db.execute(
                    "INSERT INTO adapters (name, created_at, owner, shared, discovered) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (spec.name, now, owner, int(shared), int(discovered)),
                )
            elif exists is None:
                raise AdapterNotFound(f"adapter {spec.name!r} not found", adapter=spec.name)
            # The tombstone row outlives the adapter: a re-created name goes on counting.
            # The adapter's own counter too, in case an older binary wrote since.
            row = db.execute(
                "SELECT next_version FROM version_numbers WHERE name=?", (spec.name,)
            ).fetchone()
            number = max(1 if row is None else int(row[0]), 1 if create else int(exists[0]))
            db.execute(
                "INSERT INTO versions (adapter, version, sha256, size_bytes, rank, alpha, "
                "target_modules, base_model, source, path, created_at, config_sha256, "
                "defaults) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    spec.name,
                    number,
                    spec.sha256,
                    spec.size_bytes,
                    spec.rank,
                    spec.alpha,
                    json.dumps(spec.target_modules),
                    spec.base_model,
                    source,
                    path,
                    now,
                    spec.config_sha256,
                    None if defaults is None else json.dumps(defaults.as_dict()),
                ),
            )
            db.execute(
                "INSERT INTO version_numbers (name, next_version) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET next_version=excluded.next_version",
                (spec.name, number + 1),
            )
            # Kept in step for readers of older versions (a rollback of the upgrade).
            db.execute("UPDATE adapters SET next_version=? WHERE name=?", (number + 1, spec.name))
            if make_current or create:
                db.execute(
                    "UPDATE adapters SET current_version=? WHERE name=?", (number, spec.name)
                )
        record = self.get(spec.name).version(number)
        assert record is not None
        return record

    def get(self, name: str) -> AdapterRecord:
        with self._db.read() as db:
            row = db.execute(
                f"SELECT {_ADAPTER_COLUMNS} FROM adapters WHERE name=?",
                (name,),
            ).fetchone()
            if row is None:
                raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
            versions = db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE adapter=? ORDER BY version",
                (name,),
            ).fetchall()
        return _adapter(row, versions)

    def list_adapters(self) -> list[AdapterRecord]:
        with self._db.read() as db:
            rows = _by_name(db.execute(f"SELECT {_ADAPTER_COLUMNS} FROM adapters").fetchall())
            versions = db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions ORDER BY version"
            ).fetchall()
        by_name: dict[str, list[tuple[object, ...]]] = {}
        for v in versions:
            by_name.setdefault(str(v[0]), []).append(v)
        return [_adapter(r, by_name.get(str(r[0]), [])) for r in rows]

    def set_current(self, name: str, version: int) -> AdapterRecord:
        with self._write() as db:
            _require_version(db, name, version)
            db.execute("UPDATE adapters SET current_version=? WHERE name=?", (version, name))
        return self.get(name)

    def set_access(self, name: str, *, owner: str | None, shared: bool) -> AdapterRecord:
        with self._write() as db:
            _require_adapter(db, name)
            if owner is not None:
                _require_tenant(db, owner)
            db.execute(
                "UPDATE adapters SET owner=?, shared=? WHERE name=?", (owner, int(shared), name)
            )
        return self.get(name)

    def set_pinned(self, name: str, pinned: bool) -> AdapterRecord:
        with self._write() as db:
            _require_adapter(db, name)
            db.execute("UPDATE adapters SET pinned=? WHERE name=?", (int(pinned), name))
        return self.get(name)

    def delete_version(self, name: str, version: int) -> VersionRecord:
        record = self.get(name).version(version)
        with self._write() as db:
            current = _require_version(db, name, version)
            if current == version:
                raise InUse(
                    f"{name}@{version} is the current version; make another version current first",
                    adapter=name,
                )
            for alias in _aliases(db):
                if any(v.adapter == name and v.version == version for v in alias.variants):
                    raise InUse(f"alias {alias.name!r} routes to {name}@{version}", adapter=name)
            db.execute("DELETE FROM versions WHERE adapter=? AND version=?", (name, version))
        assert record is not None
        return record

    def delete_adapter(self, name: str) -> AdapterRecord:
        record = self.get(name)
        with self._write() as db:
            _require_adapter(db, name)
            for alias in _aliases(db):
                if any(v.adapter == name for v in alias.variants):
                    raise InUse(f"alias {alias.name!r} routes to adapter {name!r}", adapter=name)
            db.execute("DELETE FROM versions WHERE adapter=?", (name,))
            db.execute("DELETE FROM adapters WHERE name=?", (name,))
        return record

    # -- aliases -----------------------------------------------------------------------

    def put_alias(
        self,
        name: str,
        variants: tuple[Variant, ...],
        *,
        owner: str | None = None,
        shared: bool = False,
    ) -> AliasRecord:
        """Create or replace alias `name`; every variant must name an existing version."""
        now = time.time()
        if (
            not variants
            or any(v.weight < 0 for v in variants)
            or sum(v.weight for v in variants) <= 0
        ):
            raise InvalidAlias(
                f"alias {name!r}: weights must be >= 0 with a positive sum", adapter=name
            )
        if len({v.key for v in variants}) != len(variants):
            raise InvalidAlias(f"alias {name!r}: a variant is listed twice", adapter=name)
        with self._write() as db:
            if db.execute("SELECT 1 FROM adapters WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"{name!r} is already an adapter", adapter=name)
            for v in variants:
                if v.version is None:
                    if _require_adapter(db, v.adapter) is None:
                        raise InvalidAlias(
                            f"alias {name!r}: adapter {v.adapter!r} has no current version",
                            adapter=name,
                        )
                else:
                    _require_version(db, v.adapter, v.version)
            row = _alias_row(db, name)
            created = float(str(row[2])) if row is not None else now
            db.execute(
                f"INSERT INTO aliases ({_ALIAS_COLUMNS}) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (name) DO UPDATE SET variants=excluded.variants, "
                "updated_at=excluded.updated_at, owner=excluded.owner, shared=excluded.shared",
                (name, _dump_variants(variants), created, now, owner, int(shared)),
            )
        return AliasRecord(
            name=name,
            variants=variants,
            created_at=created,
            updated_at=now,
            owner=owner,
            shared=shared,
        )

    def get_alias(self, name: str) -> AliasRecord:
        with self._db.read() as db:
            row = _alias_row(db, name)
        if row is None:
            raise AdapterNotFound(f"alias {name!r} not found", adapter=name)
        return _alias(row)

    def list_aliases(self) -> list[AliasRecord]:
        with self._db.read() as db:
            return _aliases(db)

    def delete_alias(self, name: str) -> AliasRecord:
        with self._write() as db:
            row = _alias_row(db, name)
            if row is None:
                raise AdapterNotFound(f"alias {name!r} not found", adapter=name)
            db.execute("DELETE FROM aliases WHERE name=?", (name,))
        return _alias(row)

    # -- tenants and API keys ------------------------------------------------------------

    def put_tenant(
        self, name: str, *, max_concurrent: int | None, tokens_per_minute: int | None
    ) -> TenantRecord:
        with self._write() as db:
            row = db.execute("SELECT created_at FROM tenants WHERE name=?", (name,)).fetchone()
            created = float(row[0]) if row is not None else time.time()
            # An upsert, not INSERT OR REPLACE: a replace deletes the row first, and the
            # delete would cascade to the tenant's API keys.
            db.execute(
                "INSERT INTO tenants VALUES (?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "max_concurrent=excluded.max_concurrent, "
                "tokens_per_minute=excluded.tokens_per_minute",
                (name, max_concurrent, tokens_per_minute, created),
            )
        return self.tenant(name)

    def tenant(self, name: str) -> TenantRecord:
        with self._db.read() as db:
            row = db.execute("SELECT * FROM tenants WHERE name=?", (name,)).fetchone()
            if row is None:
                raise TenantNotFound(f"tenant {name!r} not found", adapter=name)
            keys = db.execute(
                "SELECT key_id FROM api_keys WHERE tenant=? ORDER BY created_at, key_id", (name,)
            ).fetchall()
        return _tenant(row, tuple(str(k[0]) for k in keys))

    def tenants(self) -> list[TenantRecord]:
        with self._db.read() as db:
            names = sorted(str(r[0]) for r in db.execute("SELECT name FROM tenants").fetchall())
        return [self.tenant(n) for n in names]

    def delete_tenant(self, name: str) -> TenantRecord:
        record = self.tenant(name)
        with self._write() as db:
            owned = db.execute(
                "SELECT name FROM adapters WHERE owner=? UNION SELECT name FROM aliases "
                "WHERE owner=?",
                (name, name),
            ).fetchall()
            if owned:
                raise InUse(
                    f"tenant {name!r} still owns {sorted(str(r[0]) for r in owned)}",
                    adapter=name,
                )
            db.execute("DELETE FROM api_keys WHERE tenant=?", (name,))
            db.execute("DELETE FROM tenants WHERE name=?", (name,))
        return record

    def add_key(self, tenant: str, key_id: str, secret_sha256: str) -> KeyRecord:
        now = time.time()
        with self._write() as db:
            _require_tenant(db, tenant)
            db.execute(
                "INSERT INTO api_keys VALUES (?,?,?,?)", (key_id, tenant, secret_sha256, now)
            )
        return KeyRecord(key_id=key_id, tenant=tenant, secret_sha256=secret_sha256, created_at=now)

    def delete_key(self, tenant: str, key_id: str) -> None:
        with self._write() as db:
            gone = db.execute(
                "DELETE FROM api_keys WHERE tenant=? AND key_id=?", (tenant, key_id)
            ).rowcount
            if not gone:
                raise TenantNotFound(f"tenant {tenant!r} has no key {key_id!r}", adapter=tenant)

    def list_keys(self) -> list[KeyRecord]:
        with self._db.read() as db:
            rows = db.execute("SELECT * FROM api_keys").fetchall()
        return [
            KeyRecord(
                key_id=str(r[0]), tenant=str(r[1]), secret_sha256=str(r[2]), created_at=float(r[3])
            )
            for r in rows
        ]


def _require_tenant(db: Connection, name: str) -> None:
    if db.execute("SELECT 1 FROM tenants WHERE name=?", (name,)).fetchone() is None:
        raise TenantNotFound(f"tenant {name!r} not found", adapter=name)


def _tenant(row: tuple[object, ...], keys: tuple[str, ...]) -> TenantRecord:
    name, max_concurrent, tpm, created = row
    return TenantRecord(
        name=str(name),
        max_concurrent=None if max_concurrent is None else int(str(max_concurrent)),
        tokens_per_minute=None if tpm is None else int(str(tpm)),
        created_at=float(str(created)),
        key_ids=keys,
    )


def _require_adapter(db: Connection, name: str) -> int | None:
    row = db.execute("SELECT current_version FROM adapters WHERE name=?", (name,)).fetchone()
    if row is None:
        raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
    return None if row[0] is None else int(row[0])


def _require_version(db: Connection, name: str, version: int) -> int | None:
    current = _require_adapter(db, name)
    if (
        db.execute(
            "SELECT 1 FROM versions WHERE adapter=? AND version=?", (name, version)
        ).fetchone()
        is None
    ):
        raise AdapterNotFound(f"adapter {name!r} has no version {version}", adapter=name)
    return current


_ADAPTER_COLUMNS = "name, current_version, pinned, created_at, owner, shared, discovered"
_VERSION_COLUMNS = (
    "adapter, version, sha256, size_bytes, rank, alpha, target_modules, base_model, source, "
    "path, created_at, config_sha256, defaults"
)
_ALIAS_COLUMNS = "name, variants, created_at, updated_at, owner, shared"


def _adapter(row: tuple[object, ...], versions: list[tuple[object, ...]]) -> AdapterRecord:
    name, current, pinned, created, owner, shared, discovered = row
    return AdapterRecord(
        name=str(name),
        current_version=None if current is None else int(str(current)),
        pinned=bool(pinned),
        created_at=float(str(created)),
        versions=tuple(_version(v) for v in versions),
        owner=None if owner is None else str(owner),
        shared=bool(shared),
        discovered=None if discovered is None else bool(discovered),
    )


def _version(v: tuple[object, ...]) -> VersionRecord:
    return VersionRecord(
        adapter=str(v[0]),
        version=int(str(v[1])),
        sha256=str(v[2]),
        size_bytes=int(str(v[3])),
        rank=int(str(v[4])),
        alpha=float(str(v[5])),
        target_modules=tuple(json.loads(str(v[6]))),
        base_model=str(v[7]),
        source=str(v[8]),
        path=str(v[9]),
        created_at=float(str(v[10])),
        config_sha256=None if v[11] is None else str(v[11]),
        defaults=None if v[12] is None else ServingDefaults.from_dict(json.loads(str(v[12]))),
    )


def _alias_row(db: Connection, name: str) -> tuple[object, ...] | None:
    row: tuple[object, ...] | None = db.execute(
        f"SELECT {_ALIAS_COLUMNS} FROM aliases WHERE name=?", (name,)
    ).fetchone()
    return row


def _aliases(db: Connection) -> list[AliasRecord]:
    rows = _by_name(db.execute(f"SELECT {_ALIAS_COLUMNS} FROM aliases").fetchall())
    return [_alias(r) for r in rows]


def _by_name(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    # Sorted here, not by ORDER BY: PostgreSQL sorts text by the database's collation
    # (locale-dependent), SQLite by bytes; Python gives the same order on both.
    return sorted(rows, key=lambda r: str(r[0]))


def _alias(row: tuple[object, ...]) -> AliasRecord:
    variants = tuple(
        Variant(adapter=v["adapter"], version=v["version"], weight=v["weight"])
        for v in json.loads(str(row[1]))
    )
    return AliasRecord(
        name=str(row[0]),
        variants=variants,
        created_at=float(str(row[2])),
        updated_at=float(str(row[3])),
        owner=None if row[4] is None else str(row[4]),
        shared=bool(row[5]),
    )


def _dump_variants(variants: tuple[Variant, ...]) -> str:
    return json.dumps(
        [{"adapter": v.adapter, "version": v.version, "weight": v.weight} for v in variants]
    )
