"""The registry service: validated registration from any source, kept in SQLite or
PostgreSQL (store.py), read from an in-memory snapshot (requests never touch the database).

`Registry` owns the adapters, their versions and their files; aliases (aliases.py) and
tenants with their keys (tenants.py) are parts of the same snapshot with owners of their
own, reached through `Registry` (one object for callers, one lock, one refresh).

Writes go to the database first and then refresh the snapshot, so what a request sees
is always something that has been durably acknowledged.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from adapters_registry.aliases import Aliases
from adapters_registry.base_model import BaseModelShapes
from adapters_registry.database import Database
from adapters_registry.errors import (
    AdapterError,
    AdapterNotFound,
    AlreadyExists,
    CacheFull,
    InsufficientStorage,
    InvalidChecksum,
    InvalidSource,
    MalformedAdapter,
    SourceChanged,
    TenantNotFound,
)
from adapters_registry.names import check_name
from adapters_registry.records import (
    AdapterRecord,
    ServingDefaults,
    VersionRecord,
)
from adapters_registry.sources import (
    DiskCache,
    Source,
    Sources,
    SourcesConfig,
    UploadSource,
    fsync_dir,
    is_url,
    staging,
)
from adapters_registry.sources.base import storage_errors
from adapters_registry.sources.cache import sweep_staging
from adapters_registry.spec import AdapterSpec
from adapters_registry.store import Store
from adapters_registry.tenants import Tenants, usable_by
from adapters_registry.validate import WEIGHTS_FILE, Limits, inspect_adapter

# usable_by: where callers found it before tenants.py owned it.
__all__ = ["Registry", "RegistryConfig", "usable_by"]

log = logging.getLogger("loraswap.registry")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A folder moved into the store is recorded within milliseconds; one older than this
# that no version references was left by a crash in between (another replica sharing
# the storage may be between the two steps right now: hence the grace).
_UNRECORDED_GRACE_S = 60.0


@dataclass(frozen=True)
class RegistryConfig:
    database: str | Path  # an SQLite file, or a database URL (store.open_database)
    storage_dir: Path  # uploads live here, and the download cache
    allowed_roots: tuple[Path, ...]
    cache_max_bytes: int
    limits: Limits
    sources: SourcesConfig = field(default_factory=SourcesConfig)


@dataclass(frozen=True)
class _Placement:
    """How a validated version enters the registry."""

    create: bool
    make_current: bool
    owner: str | None
    shared: bool
    discovered: bool = False
    defaults: ServingDefaults | None = None


class Registry:
    def __init__(
        self, config: RegistryConfig, base: BaseModelShapes, in_use: Callable[[], set[str]] = set
    ) -> None:
        self.config = config
        self.base = base
        self._store = Store(config.database)
        # The content-addressed store of the files we keep: uploads and local sources
        # (copied at registration: what was validated is what the engine reads).
        self._uploads = config.storage_dir / "uploads"
        self._uploads.mkdir(parents=True, exist_ok=True)
        self.cache = DiskCache(config.storage_dir / "cache", config.cache_max_bytes, in_use)
        self.sources = Sources(config.sources, config.allowed_roots)
        # Folders whose files were hashed by this process: each stored or cached folder
        # is verified on its first use after a start (a crash or a disk may have torn it).
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._adapters: dict[str, AdapterRecord] = {}
        self._tenants = Tenants(self._store, self._lock)
        self._aliases = Aliases(self._store, self._lock, self.adapter, self._tenants)
        # Aliases', tenants' and keys' own reads and writes, under the names callers use.
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
        # Bumped on every change of adapters (aliases count their own): lets readers cache
        # what they derive from the snapshot (e.g. the names /v1/models lists).
        self._generation = 0
        # Content digests of deleted versions whose files a running request may still
        # read: removed by `release_files` once nothing holds them (review L5).
        self._orphans: dict[str, set[Path]] = {}
        self._reload()
        self._sweep()

    @property
    def database(self) -> Database:
        """The registry's database, shared with the experiment tables (experiments.py)."""
        return self._store.database

    def close(self) -> None:
        self.sources.close()
        self._store.close()

    def _sweep(self) -> None:
        """Security review L4: what a kill -9 left behind (staging folders, a folder
        moved into the store but never recorded) goes at start."""
        swept = sweep_staging(self._uploads) + sweep_staging(self.cache.staging_root)
        referenced = {Path(v.path).name for a in self._adapters.values() for v in a.versions}
        now = time.time()
        for path in self._uploads.iterdir():
            if path.name.startswith(".") or path.name in referenced:
                continue
            try:
                if now - path.stat().st_mtime < _UNRECORDED_GRACE_S:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
        if swept:
            log.info("removed %d leftovers of an earlier run: %s", len(swept), swept)

    # -- reads: the in-memory snapshot -------------------------------------------------

    def adapter(self, name: str) -> AdapterRecord | None:
        return self._adapters.get(name)

    def adapters(self) -> list[AdapterRecord]:
        return sorted(self._adapters.values(), key=lambda a: a.name)

    @property
    def generation(self) -> int:
        """Changes whenever an adapter or alias is added, changed or removed."""
        return self._generation + self._aliases.generation

    def is_referenced(self, name: str, version: int) -> bool:
        """Whether new requests can reach version `version` of `name` (it is current, or an
        alias pins it): `(name, version) in referenced_versions()`, in O(1)."""
        record = self._adapters.get(name)
        if record is not None and record.current_version == version:
            return True
        return self._aliases.pins(name, version)

    def referenced_versions(self) -> set[tuple[str, int]]:
        """Every (adapter, version) that new requests can reach: current ones and pins."""
        out = {
            (a.name, a.current_version)
            for a in self._adapters.values()
            if a.current_version is not None
        }
        return out | self._aliases.pinned_versions()

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
        how = _Placement(create, make_current, owner, shared, discovered, defaults)
        check_name(name)
        sha256 = _checked_sha(sha256, name)
        self._precheck(name, how)
        try:
            parsed = self.sources.parse(source)
        except AdapterError as exc:
            exc.adapter = exc.adapter or name
            raise
        if parsed.remote:
            return self._register_download(name, parsed, sha256, how)
        return self._register_stored(name, parsed, sha256, how)

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
        how = _Placement(create, make_current, owner, shared, defaults=defaults)
        check_name(name)
        sha256 = _checked_sha(sha256, name)
        self._precheck(name, how)
        return self._register_stored(name, UploadSource(files), sha256, how)

    def _register_stored(
        self, name: str, source: Source, sha256: str | None, how: _Placement
    ) -> VersionRecord:
        """A source copied into the store (uploads, local folders): fetched into a
        staging folder, validated there, then moved in, fsynced, and recorded."""
        # storage_errors outside staging: the staged files are gone before it reports.
        with storage_errors(), staging(self._uploads) as tmp:
            fetched = self.sources.fetch(source, tmp, max_bytes=self.config.limits.max_bytes)
            spec = self._inspect(tmp, name, sha256)
            # Keyed by weights *and* config: the same weights uploaded with another config
            # are another content, not the first upload's folder (review M4).
            target, created = self._move_in(tmp, spec.content_digest)
        try:
            return self._record(spec, source=source.pinned(fetched), path=target, how=how)
        except AdapterError:
            if created and not self._content_referenced(spec.content_digest):
                shutil.rmtree(target, ignore_errors=True)
            raise

    def _move_in(self, tmp: Path, content_digest: str) -> tuple[Path, bool]:
        """Move the validated folder `tmp` into the store, named after its content digest
        (weights and the config fields that change the math); (its path, whether this
        call created it)."""
        target = self._uploads / content_digest
        if (target / WEIGHTS_FILE).is_file():
            return target, False
        try:
            os.rename(tmp, target)
        except OSError:
            # Another registration of the same files moved its copy in first (ENOTEMPTY):
            # the same content, so use it.
            if (target / WEIGHTS_FILE).is_file():
                return target, False
            raise
        fsync_dir(self._uploads)
        self._verified.add(str(target))
        return target, True

    def _register_download(
        self, name: str, source: Source, sha256: str | None, how: _Placement
    ) -> VersionRecord:
        # Always fetched: a cache entry found by the weights' sha256 alone would pin the
        # config of whoever registered those weights first (review M4).
        with storage_errors(), self.cache.staging() as tmp:
            fetched = self.sources.fetch(source, tmp, max_bytes=self._download_cap())
            spec = self._inspect(tmp, name, sha256)
            created = self.cache.get(spec.content_digest) is None
            cached = self.cache.put(tmp, spec.content_digest)
            self._verified.add(str(cached))
        recorded = source.pinned(fetched)
        try:
            return self._record(spec, source=recorded, path=cached, how=how)
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
        if how.owner is not None and self._tenants.tenant(how.owner) is None:
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
                defaults=how.defaults,
            )
            self._refresh_adapter(spec.name)
        return record

    def _content_referenced(self, digest: str) -> bool:
        return any(v.content_digest == digest for a in self._adapters.values() for v in a.versions)

    # -- making a version servable -----------------------------------------------------

    def local_files(self, version: VersionRecord) -> Path:
        """A folder holding exactly the registered files of `version`, verified.

        Downloads evicted from the cache are fetched again (their pinned objects) and
        checked again; stored and cached folders are checked on their first use after a
        start. Security review M7: what reaches the requester (a /v1 tenant, maybe) names
        no path or URL; the details go to the log.
        """
        if is_url(version.source):
            return self._cached_files(version)
        path = Path(version.path)
        if path.parent != self._uploads or str(path) not in self._verified:
            # (Versions recorded before sources were copied into the store are read in
            # place, so they are checked at every load, as they were then.)
            self._verify(path, version)
            if path.parent == self._uploads:
                self._verified.add(str(path))
        return path

    def _cached_files(self, version: VersionRecord) -> Path:
        path = self.cache.get(version.content_digest)
        if path is not None and str(path) not in self._verified:
            try:
                self._verify(path, version)
                self._verified.add(str(path))
            except SourceChanged:
                log.warning("%s: cached files damaged; fetching them again", _label(version))
                self.cache.remove(version.content_digest)
                path = None
        if path is not None:
            return path
        try:
            source = self.sources.parse(version.source)
            with storage_errors(), self.cache.staging() as tmp:
                self.sources.fetch(source, tmp, max_bytes=self._download_cap())
                self._verify(tmp, version)
                path = self.cache.put(tmp, version.content_digest)
        except (CacheFull, InsufficientStorage):  # transient, the server's: say so
            raise
        except AdapterError as exc:
            log.warning("%s: fetching %s again failed: %s", _label(version), version.source, exc)
            if isinstance(exc, SourceChanged | MalformedAdapter):
                raise SourceChanged(_changed(version), adapter=version.adapter) from exc
            raise InvalidSource(
                f"{_label(version)}: its files could not be fetched again from its source "
                "(details in the server log)",
                adapter=version.adapter,
            ) from exc
        self._verified.add(str(path))
        return path

    def _verify(self, path: Path, version: VersionRecord) -> None:
        try:
            spec = self._inspect(path, version.adapter, version.sha256)
        except (MalformedAdapter, AdapterNotFound) as exc:
            # It was valid when registered: any such failure now means the files changed
            # (ChecksumMismatch is a MalformedAdapter).
            log.warning("%s: files at %s changed: %s", _label(version), path, exc)
            raise SourceChanged(_changed(version), adapter=version.adapter) from exc
        # The weights are the same; the config must be too, or the same tensors would be
        # served with another scale or targets under the old name (review M4).
        if version.config_sha256 is not None and spec.config_sha256 != version.config_sha256:
            log.warning("%s: adapter_config.json at %s changed", _label(version), path)
            raise SourceChanged(_changed(version), adapter=version.adapter)

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

    def _write(self, name: str, op: Callable[[], AdapterRecord]) -> AdapterRecord:
        with self._lock:
            record = op()
            self._adapters[name] = record
            self._generation += 1
        return record

    def _forget_files(self, version: VersionRecord) -> None:
        # Files we own (whatever lies under storage_dir: uploads, downloads) go once no
        # version references that content and no running request reads it (the engine
        # may re-read a folder while it serves from it); a local folder registered before
        # sources were copied into the store belongs to its owner and is never touched.
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
            self._verified.discard(str(path))
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
        self._aliases.reload()
        self._tenants.reload()

    def set_access(self, name: str, *, owner: str | None, shared: bool) -> AdapterRecord:
        return self._write(name, lambda: self._store.set_access(name, owner=owner, shared=shared))


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


def _label(version: VersionRecord) -> str:
    return f"{version.adapter}@{version.version}"


def _changed(version: VersionRecord) -> str:
    return (
        f"{_label(version)}: its files changed or vanished at the source since "
        "registration; register a new version"
    )
