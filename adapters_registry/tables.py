"""The registry's queries, one class per part: adapters and their versions, aliases,
tenants with their API keys. `Store` (store.py) puts them behind one object.

The SQL is written once for both databases; database.py holds what differs
(placeholders, transactions, the write lock, driver errors). Every write is one
transaction, committed durably before the call returns, and bumps the change counter
other replicas watch (`Tables._write`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

from adapters_registry.database import Connection, Database
from adapters_registry.errors import (
    AdapterNotFound,
    AlreadyExists,
    InUse,
    InvalidAlias,
    TenantNotFound,
)
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


class Tables:
    """One part's queries over the registry's database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction that counts as a registry change (see Store.generation)."""
        with self._db.write() as db:
            yield db
            # Reached only when the change succeeded; commits with it.
            db.execute(
                "INSERT INTO meta VALUES ('generation', '1') ON CONFLICT (key) DO UPDATE "
                "SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT)"
            )


class AdapterTables(Tables):
    """Adapters and their versions. Version numbers are per adapter, increasing, and never
    reused, even after a delete, so `pirate@3` always names the same weights, also when
    several replicas write to one PostgreSQL database."""

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
            if create:
                _insert_adapter(db, spec.name, now, owner, shared, discovered)
            number = _take_number(db, spec.name)
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


def _insert_adapter(
    db: Connection, name: str, now: float, owner: str | None, shared: bool, discovered: bool
) -> None:
    if db.execute("SELECT 1 FROM adapters WHERE name=?", (name,)).fetchone() is not None:
        raise AlreadyExists(
            f"adapter {name!r} already exists; add a version to it instead", adapter=name
        )
    if _alias_row(db, name) is not None:
        raise AlreadyExists(f"{name!r} is already an alias", adapter=name)
    db.execute(
        "INSERT INTO adapters (name, created_at, owner, shared, discovered) VALUES (?, ?, ?, ?, ?)",
        (name, now, owner, int(shared), int(discovered)),
    )


def _take_number(db: Connection, name: str) -> int:
    """The next version number of adapter `name` (which exists), taken: never handed out
    again, even after the adapter is deleted and created anew."""
    exists = db.execute("SELECT next_version FROM adapters WHERE name=?", (name,)).fetchone()
    if exists is None:
        raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
    # The tombstone row outlives the adapter: a re-created name goes on counting.
    # The adapter's own counter too, in case an older binary wrote since.
    row = db.execute("SELECT next_version FROM version_numbers WHERE name=?", (name,)).fetchone()
    number = max(1 if row is None else int(row[0]), int(exists[0]))
    db.execute(
        "INSERT INTO version_numbers (name, next_version) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET next_version=excluded.next_version",
        (name, number + 1),
    )
    # Kept in step for readers of older versions (a rollback of the upgrade).
    db.execute("UPDATE adapters SET next_version=? WHERE name=?", (number + 1, name))
    return number


class AliasTables(Tables):
    """Aliases: names over weighted adapter versions."""

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
        _check_variants(name, variants)
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


def _check_variants(name: str, variants: tuple[Variant, ...]) -> None:
    if not variants or any(v.weight < 0 for v in variants) or sum(v.weight for v in variants) <= 0:
        raise InvalidAlias(
            f"alias {name!r}: weights must be >= 0 with a positive sum", adapter=name
        )
    if len({v.key for v in variants}) != len(variants):
        raise InvalidAlias(f"alias {name!r}: a variant is listed twice", adapter=name)


class TenantTables(Tables):
    """Tenants and their API keys (of which only a digest of the secret is kept)."""

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
