"""The registry service: validated registration from any source, kept in SQLite or
PostgreSQL (store.py), read from an in-memory snapshot (requests never touch the database).

`Registry` is the one object callers hold, with one lock and one refresh over parts that
have an owner each: adapters and their versions (adapters.py), their files (files.py),
aliases (aliases.py), and tenants with their keys (tenants.py). What needs several parts
at once (registration, deletion, whether a version is reachable) is done here.

Writes go to the database first and then refresh the snapshot, so what a request sees
is always something that has been durably acknowledged.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from adapters_registry.adapters import Adapters, Placement
from adapters_registry.aliases import Aliases
from adapters_registry.base_model import BaseModelShapes
from adapters_registry.database import Database
from adapters_registry.errors import (
    AdapterError,
    AdapterNotFound,
    AlreadyExists,
    InvalidChecksum,
    TenantNotFound,
)
from adapters_registry.files import StoredFiles
from adapters_registry.names import check_name
from adapters_registry.records import AdapterRecord, ServingDefaults, VersionRecord
from adapters_registry.sources import Source, SourcesConfig, UploadSource
from adapters_registry.spec import AdapterSpec
from adapters_registry.store import Store
from adapters_registry.tenants import Tenants, usable_by
from adapters_registry.validate import Limits, inspect_adapter

# usable_by: where callers found it before tenants.py owned it.
__all__ = ["Registry", "RegistryConfig", "usable_by"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RegistryConfig:
    database: str | Path  # an SQLite file, or a database URL (store.open_database)
    storage_dir: Path  # uploads live here, and the download cache
    allowed_roots: tuple[Path, ...]
    cache_max_bytes: int
    limits: Limits
    sources: SourcesConfig = field(default_factory=SourcesConfig)


class Registry:
    def __init__(
        self, config: RegistryConfig, base: BaseModelShapes, in_use: Callable[[], set[str]] = set
    ) -> None:
        self.config = config
        self.base = base
        self._store = Store(config.database)
        self._lock = threading.Lock()
        self._versions = Adapters(self._store, self._lock)
        self._tenants = Tenants(self._store, self._lock)
        self._aliases = Aliases(self._store, self._lock, self._versions.adapter, self._tenants)
        self._files = StoredFiles(
            config.storage_dir,
            sources=config.sources,
            allowed_roots=config.allowed_roots,
            cache_max_bytes=config.cache_max_bytes,
            max_bytes=config.limits.max_bytes,
            in_use=in_use,
            inspect=self._inspect,
            referenced=self._versions.content_referenced,
            lock=self._lock,
        )
        self.cache = self._files.cache
        self.sources = self._files.sources
        # The parts' own reads and writes, under the names callers use.
        self.adapter = self._versions.adapter
        self.adapters = self._versions.adapters
        self.set_current = self._versions.set_current
        self.set_pinned = self._versions.set_pinned
        self.set_access = self._versions.set_access
        self.local_files = self._files.local_files
        self.alias = self._aliases.alias
        self.aliases = self._aliases.aliases
        self.put_alias = self._aliases.put_alias
        self.delete_alias = self._aliases.delete_alias
        self.tenant = self._tenants.tenant
        self.tenants = self._tenants.tenants
        self.put_tenant = self._tenants.put_tenant
        self.delete_tenant = self._tenants.delete_tenant
        self.create_key = self._tenants.create_key
        self.delete_key = self._tenants.delete_key
        self.has_tenants = self._tenants.has_tenants
        self.authenticate = self._tenants.authenticate
        # The database's change counter when this snapshot was read (see `refresh`).
        self._store_generation = self._store.generation()
        self._reload()
        self._files.sweep(self._versions.folder_names())

    @property
    def database(self) -> Database:
        """The registry's database, shared with the experiment tables (experiments.py)."""
        return self._store.database

    # The snapshot of adapters, and the folders verified since the start: the parts'
    # own, reached here by tests that plant a record or forget a verification.
    @property
    def _adapters(self) -> dict[str, AdapterRecord]:
        return self._versions.snapshot

    @property
    def _verified(self) -> set[str]:
        return self._files.verified

    def close(self) -> None:
        self._files.close()
        self._store.close()

    # -- reads: the in-memory snapshot -------------------------------------------------

    @property
    def generation(self) -> int:
        """Changes whenever an adapter or alias is added, changed or removed: lets readers
        cache what they derive from the snapshot (e.g. the names /v1/models lists)."""
        return self._versions.generation + self._aliases.generation

    def is_referenced(self, name: str, version: int) -> bool:
        """Whether new requests can reach version `version` of `name` (it is current, or an
        alias pins it): `(name, version) in referenced_versions()`, in O(1)."""
        record = self._versions.adapter(name)
        if record is not None and record.current_version == version:
            return True
        return self._aliases.pins(name, version)

    def referenced_versions(self) -> set[tuple[str, int]]:
        """Every (adapter, version) that new requests can reach: current ones and pins."""
        return self._versions.current_versions() | self._aliases.pinned_versions()

    # -- registration ------------------------------------------------------------------

    def register(
        self,
        name: str,
        source: str,
        *,
        sha256: str | None = None,
        create: bool = True,
        make_current: bool = True,
        owner: str | None = None,
        shared: bool = False,
        discovered: bool = False,
        defaults: ServingDefaults | None = None,
    ) -> VersionRecord:
        """Validate the adapter at `source` and record it as a new version of `name`,
        with its serving `defaults` (validated by the caller: server/serving.py).

        `create` registers a new adapter (owned by tenant `owner`, usable by every tenant
        when `shared`; `discovered`: by folder discovery, so it follows its folder);
        otherwise the version is added to the existing one.
        """
        how = Placement(create, make_current, owner, shared, discovered, defaults)
        sha256 = self._precheck(name, sha256, how)
        try:
            parsed = self.sources.parse(source)
        except AdapterError as exc:
            exc.adapter = exc.adapter or name
            raise
        return self._register(name, parsed, sha256, how)

    def register_upload(
        self,
        name: str,
        files: dict[str, BinaryIO],
        *,
        sha256: str | None = None,
        create: bool = True,
        make_current: bool = True,
        owner: str | None = None,
        shared: bool = False,
        defaults: ServingDefaults | None = None,
    ) -> VersionRecord:
        """Like `register`, from uploaded adapter_config.json + adapter_model.safetensors."""
        how = Placement(create, make_current, owner, shared, defaults=defaults)
        sha256 = self._precheck(name, sha256, how)
        return self._register(name, UploadSource(files), sha256, how)

    def _precheck(self, name: str, sha256: str | None, how: Placement) -> str | None:
        """Refuse before any download (a doomed registration must not fetch anything);
        the expected sha256, normalised."""
        check_name(name)
        sha256 = _checked_sha(sha256, name)
        if how.create and (name in self._versions or name in self._aliases):
            raise AlreadyExists(f"{name!r} already exists", adapter=name)
        if not how.create and name not in self._versions:
            raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
        if how.owner is not None and self._tenants.tenant(how.owner) is None:
            raise TenantNotFound(f"tenant {how.owner!r} not found", adapter=name)
        return sha256

    def _register(
        self, name: str, source: Source, sha256: str | None, how: Placement
    ) -> VersionRecord:
        # Remote sources go to the download cache; the others are copied into the store.
        fetch = self._files.download if source.remote else self._files.store
        placed = fetch(source, name, sha256)
        try:
            return self._versions.record(
                placed.spec, source=placed.source, path=placed.path, how=how
            )
        except AdapterError:
            self._files.discard(placed)
            raise

    def _inspect(self, path: Path, name: str, sha256: str | None) -> AdapterSpec:
        return inspect_adapter(
            path, name=name, base=self.base, limits=self.config.limits, expected_sha256=sha256
        )

    # -- deletion: the record now, its files once nothing reads them -------------------

    def delete_version(self, name: str, version: int) -> VersionRecord:
        record = self._versions.delete_version(name, version)
        self._files.forget(record)
        return record

    def delete_adapter(self, name: str) -> AdapterRecord:
        record = self._versions.delete_adapter(name)
        for version in record.versions:
            self._files.forget(version)
        return record

    @property
    def files_pending_removal(self) -> bool:
        """Whether some deleted version's files wait for their last reader."""
        return self._files.pending_removal

    def release_files(self) -> list[str]:
        """Remove the files of deleted versions that nothing reads any more (the adapter
        router calls this when a version leaves the engine); their digests."""
        return self._files.release()

    # -- other replicas' writes --------------------------------------------------------

    def refresh(self) -> bool:
        """Reload the snapshot if the database changed since (another replica wrote to
        it); True if it did. Cheap when nothing changed: one single-row read."""
        if self._store.generation() == self._store_generation:
            return False
        with self._lock:
            # Read before reloading: a write landing during the reload is seen next time.
            self._store_generation = self._store.generation()
            self._reload()
        return True

    def _reload(self) -> None:
        self._versions.reload()
        self._aliases.reload()
        self._tenants.reload()


def _checked_sha(sha256: str | None, name: str) -> str | None:
    """Security review M3: the expected sha256 names a cache entry, so it must be exactly
    64 hex digits before it is used for anything (no '/', no '..')."""
    if sha256 is None:
        return None
    normal = sha256.strip().lower()
    if not _SHA256.fullmatch(normal):
        error = InvalidChecksum("sha256 must be 64 hex digits", adapter=name)
        error.param = "sha256"
        raise error
    return normal
