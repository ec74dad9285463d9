"""The registry service: validated registration from any source, kept in SQLite or
PostgreSQL (store.py), read from an in-memory snapshot (requests never touch the database).

Writes go to the database first and then refresh the snapshot, so what a request sees
is always something that has been durably acknowledged.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from adapters_registry import keys
from adapters_registry.base_model import BaseModelShapes
from adapters_registry.errors import (
    AdapterError,
    AdapterNotFound,
    AlreadyExists,
    InvalidAlias,
    InvalidSource,
    MalformedAdapter,
    SourceChanged,
    TenantNotFound,
)
from adapters_registry.names import check_name
from adapters_registry.paths import confine
from adapters_registry.records import (
    AdapterRecord,
    AliasRecord,
    KeyRecord,
    TenantRecord,
    Variant,
    VersionRecord,
)
from adapters_registry.sources import DiskCache, download, is_url, save_upload, staging
from adapters_registry.spec import AdapterSpec
from adapters_registry.store import Store
from adapters_registry.validate import Limits, inspect_adapter


@dataclass(frozen=True)
class RegistryConfig:
    database: str | Path  # an SQLite file, or a database URL (store.open_database)
    storage_dir: Path  # uploads live here, and the download cache
    allowed_roots: tuple[Path, ...]
    cache_max_bytes: int
    limits: Limits


@dataclass(frozen=True)
class _Placement:
    """How a validated version enters the registry."""

    create: bool
    make_current: bool
    owner: str | None
    shared: bool
    discovered: bool = False


class Registry:
    def __init__(
        self, config: RegistryConfig, base: BaseModelShapes, in_use: Callable[[], set[str]] = set
    ) -> None:
        self.config = config
        self.base = base
        self._store = Store(config.database)
        self._uploads = config.storage_dir / "uploads"
        self._uploads.mkdir(parents=True, exist_ok=True)
        self.cache = DiskCache(config.storage_dir / "cache", config.cache_max_bytes, in_use)
        self._lock = threading.Lock()
        self._adapters: dict[str, AdapterRecord] = {}
        self._aliases: dict[str, AliasRecord] = {}
        self._tenants: dict[str, TenantRecord] = {}
        self._keys: dict[str, KeyRecord] = {}
        # The database's change counter when this snapshot was read (see `refresh`).
        self._store_generation = self._store.generation()
        # (adapter, version) pinned by some alias: kept up to date on alias writes, so that
        # "can a new request still reach this version?" costs O(1), not O(registry).
        self._alias_pins: frozenset[tuple[str, int]] = frozenset()
        # Bumped on every change of adapters or aliases: lets readers cache what they
        # derive from the snapshot (e.g. the names /v1/models lists).
        self._generation = 0
        # Content digests of deleted versions whose files a running request may still
        # read: removed by `release_files` once nothing holds them (review L5).
        self._orphans: dict[str, set[Path]] = {}
        self._reload()

    def close(self) -> None:
        self._store.close()

    # -- reads: the in-memory snapshot -------------------------------------------------

    def adapter(self, name: str) -> AdapterRecord | None:
        return self._adapters.get(name)

    def alias(self, name: str) -> AliasRecord | None:
        return self._aliases.get(name)

    def adapters(self) -> list[AdapterRecord]:
        return sorted(self._adapters.values(), key=lambda a: a.name)

    def aliases(self) -> list[AliasRecord]:
        return sorted(self._aliases.values(), key=lambda a: a.name)

    @property
    def generation(self) -> int:
        """Changes whenever an adapter or alias is added, changed or removed."""
        return self._generation

    def is_referenced(self, name: str, version: int) -> bool:
        """Whether new requests can reach version `version` of `name` (it is current, or an
        alias pins it): `(name, version) in referenced_versions()`, in O(1)."""
        record = self._adapters.get(name)
        if record is not None and record.current_version == version:
            return True
        return (name, version) in self._alias_pins

    def referenced_versions(self) -> set[tuple[str, int]]:
        """Every (adapter, version) that new requests can reach: current ones and pins."""
        out = {
            (a.name, a.current_version)
            for a in self._adapters.values()
            if a.current_version is not None
        }
        for alias in self._aliases.values():
            out |= {(v.adapter, v.version) for v in alias.variants if v.version is not None}
        return out

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
    ) -> VersionRecord:
        """Validate the adapter at `source` and record it as a new version of `name`.

        `create` registers a new adapter (owned by tenant `owner`, usable by every tenant
        when `shared`; `discovered`: by folder discovery, so it follows its folder);
        otherwise the version is added to the existing one.
        """
        how = _Placement(create, make_current, owner, shared, discovered)
        check_name(name)
        self._precheck(name, how)
        if is_url(source):
            return self._register_download(name, source, sha256, how)
        path = confine(Path(source), self.config.allowed_roots)
        if not path.is_dir():
            raise InvalidSource(f"no adapter folder at {source!r}", adapter=name)
        spec = self._inspect(path, name, sha256)
        return self._record(spec, source=str(source), path=path, how=how)

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
    ) -> VersionRecord:
        """Like `register`, from uploaded adapter_config.json + adapter_model.safetensors."""
        how = _Placement(create, make_current, owner, shared)
        check_name(name)
        self._precheck(name, how)
        with staging(self._uploads) as tmp:
            save_upload(files, tmp, max_bytes=self.config.limits.max_bytes)
            spec = self._inspect(tmp, name, sha256)
            # Keyed by weights *and* config: the same weights uploaded with another config
            # are another content, not the first upload's folder (review M4).
            target = self._uploads / spec.content_digest
            created = not target.exists()
            if created:
                tmp.rename(target)
        try:
            return self._record(spec, source="upload", path=target, how=how)
        except AdapterError:
            if created and not self._content_referenced(spec.content_digest):
                shutil.rmtree(target, ignore_errors=True)
            raise

    def _register_download(
        self, name: str, url: str, sha256: str | None, how: _Placement
    ) -> VersionRecord:
        # Always fetched: a cache entry found by the weights' sha256 alone would pin the
        # config of whoever registered those weights first (review M4).
        with self.cache.staging() as tmp:
            download(url, tmp, max_bytes=self._download_cap())
            spec = self._inspect(tmp, name, sha256)
            created = self.cache.get(spec.content_digest) is None
            cached = self.cache.put(tmp, spec.content_digest)
        try:
            return self._record(spec, source=url, path=cached, how=how)
        except AdapterError:
            if created and not self._content_referenced(spec.content_digest):
                self.cache.remove(spec.content_digest)
            raise

    def _download_cap(self) -> int:
        """Weights above the adapter cap, or above the whole cache's, are refused (413)
        as soon as the download passes it."""
        return min(self.config.limits.max_bytes, self.cache.max_bytes)

    def _precheck(self, name: str, how: _Placement) -> None:
        # Refuse before any download: a doomed registration must not fetch anything.
        if how.create and (name in self._adapters or name in self._aliases):
            raise AlreadyExists(f"{name!r} already exists", adapter=name)
        if not how.create and name not in self._adapters:
            raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
        if how.owner is not None and how.owner not in self._tenants:
            raise TenantNotFound(f"tenant {how.owner!r} not found", adapter=name)

    def _inspect(self, path: Path, name: str, sha256: str | None) -> AdapterSpec:
        return inspect_adapter(
            path, name=name, base=self.base, limits=self.config.limits, expected_sha256=sha256
        )

    def _record(
        self, spec: AdapterSpec, *, source: str, path: Path, how: _Placement
    ) -> VersionRecord:
        with self._lock:
            record = self._store.add_version(
                spec,
                source=source,
                path=str(path),
                create=how.create,
                make_current=how.make_current,
                owner=how.owner,
                shared=how.shared,
                discovered=how.discovered,
            )
            self._refresh_adapter(spec.name)
        return record

    def _content_referenced(self, digest: str) -> bool:
        return any(v.content_digest == digest for a in self._adapters.values() for v in a.versions)

    # -- making a version servable -----------------------------------------------------

    def local_files(self, version: VersionRecord) -> Path:
        """A folder holding exactly the registered weights of `version`, re-verified.

        Downloads evicted from the cache are fetched again; a local source whose files
        changed since registration is refused rather than served as the old version.
        """
        if is_url(version.source):
            path = self.cache.get(version.content_digest)
            if path is None:
                with self.cache.staging() as tmp:
                    download(version.source, tmp, max_bytes=self._download_cap())
                    self._verify(tmp, version)
                    path = self.cache.put(tmp, version.content_digest)
                return path
        path = Path(version.path)
        self._verify(path, version)
        return path

    def _verify(self, path: Path, version: VersionRecord) -> None:
        try:
            spec = self._inspect(path, version.adapter, version.sha256)
        except (MalformedAdapter, AdapterNotFound) as exc:
            # It was valid when registered: any such failure now means the files changed
            # (ChecksumMismatch is a MalformedAdapter).
            raise SourceChanged(
                f"{version.adapter}@{version.version}: its files at {version.source} "
                "changed or vanished since registration; register a new version",
                adapter=version.adapter,
            ) from exc
        # The weights are the same; the config must be too, or the same tensors would be
        # served with another scale or targets under the old name (review M4).
        if version.config_sha256 is not None and spec.config_sha256 != version.config_sha256:
            raise SourceChanged(
                f"{version.adapter}@{version.version}: its adapter_config.json changed since "
                "registration; register a new version",
                adapter=version.adapter,
            )

    # -- other writes ------------------------------------------------------------------

    def set_current(self, name: str, version: int) -> AdapterRecord:
        return self._write(name, lambda: self._store.set_current(name, version))

    def set_pinned(self, name: str, pinned: bool) -> AdapterRecord:
        return self._write(name, lambda: self._store.set_pinned(name, pinned))

    def delete_version(self, name: str, version: int) -> VersionRecord:
        with self._lock:
            record = self._store.delete_version(name, version)
            self._refresh_adapter(name)
        self._forget_files(record)
        return record

    def delete_adapter(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._store.delete_adapter(name)
            self._adapters.pop(name, None)
            self._generation += 1
        for version in record.versions:
            self._forget_files(version)
        return record

    def put_alias(
        self,
        name: str,
        variants: tuple[Variant, ...],
        *,
        owner: str | None = None,
        shared: bool = False,
    ) -> AliasRecord:
        check_name(name)
        if owner is not None and owner not in self._tenants:
            raise TenantNotFound(f"tenant {owner!r} not found", adapter=name)
        for v in variants:
            target = self._adapters.get(v.adapter)
            # An alias must not become a way into an adapter its users could not name:
            # a shared alias needs shared variants, a tenant's alias ones it may use.
            reachable = target is None or (target.shared if shared else usable_by(target, owner))
            if not reachable:
                audience = "every tenant" if shared else f"tenant {owner!r}"
                raise InvalidAlias(
                    f"alias {name!r}: adapter {v.adapter!r} is not usable by {audience}",
                    adapter=name,
                )
        with self._lock:
            record = self._store.put_alias(name, variants, owner=owner, shared=shared)
            self._aliases[name] = record
            self._aliases_changed()
        return record

    def delete_alias(self, name: str) -> AliasRecord:
        with self._lock:
            record = self._store.delete_alias(name)
            self._aliases.pop(name, None)
            self._aliases_changed()
        return record

    def _write(self, name: str, op: Callable[[], AdapterRecord]) -> AdapterRecord:
        with self._lock:
            record = op()
            self._adapters[name] = record
            self._generation += 1
        return record

    def _forget_files(self, version: VersionRecord) -> None:
        # Files we own (whatever lies under storage_dir: uploads, downloads) go once no
        # version references that content and no running request reads it (the engine
        # may re-read a folder while it serves from it); a local source belongs to its
        # owner and is never touched.
        digest = version.content_digest
        path = Path(version.path)
        if self._content_referenced(digest) or not path.is_relative_to(self.config.storage_dir):
            return
        if digest in self.cache.in_use():
            with self._lock:
                self._orphans.setdefault(digest, set()).add(path)
            return
        self._remove_files(digest, {path})

    def _remove_files(self, digest: str, paths: set[Path]) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        # A download may have been evicted and fetched again meanwhile: under this key.
        self.cache.remove(digest)

    @property
    def files_pending_removal(self) -> bool:
        """Whether some deleted version's files wait for their last reader."""
        return bool(self._orphans)

    def release_files(self) -> list[str]:
        """Remove the files of deleted versions that nothing reads any more (the adapter
        router calls this when a version leaves the engine); their digests."""
        if not self._orphans:
            return []
        in_use = self.cache.in_use()
        with self._lock:
            # Referenced again (re-registered meanwhile): its files are live, not orphans.
            for digest in [d for d in self._orphans if self._content_referenced(d)]:
                del self._orphans[digest]
            done = {d: self._orphans.pop(d) for d in list(self._orphans) if d not in in_use}
        for digest, paths in sorted(done.items()):
            self._remove_files(digest, paths)
        return sorted(done)

    def _refresh_adapter(self, name: str) -> None:
        self._adapters[name] = self._store.get(name)
        self._generation += 1

    def _aliases_changed(self) -> None:
        self._alias_pins = frozenset(
            (v.adapter, v.version)
            for alias in self._aliases.values()
            for v in alias.variants
            if v.version is not None
        )
        self._generation += 1

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
        self._adapters = {a.name: a for a in self._store.list_adapters()}
        self._aliases = {a.name: a for a in self._store.list_aliases()}
        self._aliases_changed()
        self._tenants = {t.name: t for t in self._store.tenants()}
        self._keys = {k.key_id: k for k in self._store.list_keys()}

    # -- tenants, keys and access ------------------------------------------------------

    def tenant(self, name: str) -> TenantRecord | None:
        return self._tenants.get(name)

    def tenants(self) -> list[TenantRecord]:
        return sorted(self._tenants.values(), key=lambda t: t.name)

    def put_tenant(
        self, name: str, *, max_concurrent: int | None, tokens_per_minute: int | None
    ) -> TenantRecord:
        check_name(name)
        with self._lock:
            record = self._store.put_tenant(
                name, max_concurrent=max_concurrent, tokens_per_minute=tokens_per_minute
            )
            self._tenants[name] = record
        return record

    def delete_tenant(self, name: str) -> TenantRecord:
        with self._lock:
            record = self._store.delete_tenant(name)
            self._tenants.pop(name, None)
            self._keys = {k: v for k, v in self._keys.items() if v.tenant != name}
        return record

    def create_key(self, tenant: str) -> tuple[KeyRecord, str]:
        """A new key for `tenant`: (its record, the full key, to be shown once)."""
        key_id, full, digest = keys.new_key()
        with self._lock:
            record = self._store.add_key(tenant, key_id, digest)
            self._keys[key_id] = record
            self._tenants[tenant] = self._store.tenant(tenant)
        return record, full

    def delete_key(self, tenant: str, key_id: str) -> None:
        with self._lock:
            self._store.delete_key(tenant, key_id)
            self._keys.pop(key_id, None)
            self._tenants[tenant] = self._store.tenant(tenant)

    def has_tenants(self) -> bool:
        """Open mode ends with the first tenant, not its first key: revoking every key
        must not reopen the server to anyone."""
        return bool(self._tenants)

    def authenticate(self, key: str) -> TenantRecord | None:
        """The tenant a key belongs to, or None (malformed, unknown or wrong secret)."""
        parsed = keys.parse(key)
        if parsed is None:
            return None
        record = self._keys.get(parsed[0])
        if record is None or not keys.matches(parsed[1], record.secret_sha256):
            return None
        return self._tenants.get(record.tenant)

    def set_access(self, name: str, *, owner: str | None, shared: bool) -> AdapterRecord:
        return self._write(name, lambda: self._store.set_access(name, owner=owner, shared=shared))


def usable_by(record: AdapterRecord | AliasRecord, tenant: str | None) -> bool:
    """Whether `tenant` may use an adapter or alias; None is the operator (or open mode)."""
    return tenant is None or record.shared or record.owner == tenant
