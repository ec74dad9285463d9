"""The files the registry keeps for its versions: the content-addressed store (uploads and
local sources, copied at registration: what was validated is what the engine reads) and
the download cache, where they are fetched, verified, and removed once unused.

`StoredFiles` knows folders and digests, not adapters: what a version references comes
from the caller (registry.py), which records it in the database.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters_registry.errors import (
    AdapterError,
    AdapterNotFound,
    CacheFull,
    InsufficientStorage,
    InvalidSource,
    MalformedAdapter,
    SourceChanged,
)
from adapters_registry.records import VersionRecord
from adapters_registry.sources import (
    DiskCache,
    Source,
    Sources,
    SourcesConfig,
    fsync_dir,
    is_url,
    staging,
)
from adapters_registry.sources.base import storage_errors
from adapters_registry.sources.cache import sweep_staging
from adapters_registry.spec import AdapterSpec
from adapters_registry.validate import WEIGHTS_FILE

log = logging.getLogger("loraswap.registry")
# A folder moved into the store is recorded within milliseconds; one older than this
# that no version references was left by a crash in between (another replica sharing
# the storage may be between the two steps right now: hence the grace).
_UNRECORDED_GRACE_S = 60.0

# Validates the adapter folder at a path as (adapter name, expected weights sha256).
Inspect = Callable[[Path, str, str | None], AdapterSpec]


@dataclass(frozen=True)
class PlacedFiles:
    """A validated adapter's files, in place for the version about to be recorded."""

    spec: AdapterSpec
    source: str  # the source as recorded: pinned to what was fetched
    path: Path
    created: bool  # this registration put them there (nothing else had that content)


class StoredFiles:
    def __init__(
        self,
        storage_dir: Path,
        *,
        sources: SourcesConfig,
        allowed_roots: tuple[Path, ...],
        cache_max_bytes: int,
        max_bytes: int,
        in_use: Callable[[], set[str]],
        inspect: Inspect,
        referenced: Callable[[str], bool],
        lock: threading.Lock,
    ) -> None:
        """`max_bytes`: an adapter's weights at most; `inspect` validates a folder;
        `referenced(digest)`: whether some version records that content; `lock`: the
        registry's (its writes and the removal of deleted versions' files take turns)."""
        self.storage_dir = storage_dir
        self._uploads = storage_dir / "uploads"
        self._uploads.mkdir(parents=True, exist_ok=True)
        self.cache = DiskCache(storage_dir / "cache", cache_max_bytes, in_use)
        self.sources = Sources(sources, allowed_roots)
        self._max_bytes = max_bytes
        self._inspect = inspect
        self._referenced = referenced
        self._lock = lock
        # Folders whose files were hashed by this process: each stored or cached folder
        # is verified on its first use after a start (a crash or a disk may have torn it).
        self.verified: set[str] = set()
        # Content digests of deleted versions whose files a running request may still
        # read: removed by `release` once nothing holds them (review L5).
        self._orphans: dict[str, set[Path]] = {}

    def close(self) -> None:
        self.sources.close()

    def sweep(self, recorded: set[str]) -> None:
        """Security review L4: what a kill -9 left behind (staging folders, a folder
        moved into the store but never recorded: not among the `recorded` folder names)
        goes at start."""
        swept = sweep_staging(self._uploads) + sweep_staging(self.cache.staging_root)
        now = time.time()
        for path in self._uploads.iterdir():
            if path.name.startswith(".") or path.name in recorded:
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

    # -- registration: fetch, validate, put in place -----------------------------------

    def store(self, source: Source, name: str, sha256: str | None) -> PlacedFiles:
        """A source copied into the store (uploads, local folders): fetched into a
        staging folder, validated there, then moved in and fsynced."""
        # storage_errors outside staging: the staged files are gone before it reports.
        with storage_errors(), staging(self._uploads) as tmp:
            fetched = self.sources.fetch(source, tmp, max_bytes=self._max_bytes)
            spec = self._inspect(tmp, name, sha256)
            # Keyed by weights *and* config: the same weights uploaded with another config
            # are another content, not the first upload's folder (review M4).
            target, created = self._move_in(tmp, spec.content_digest)
        return PlacedFiles(spec, source.pinned(fetched), target, created)

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
        self.verified.add(str(target))
        return target, True

    def download(self, source: Source, name: str, sha256: str | None) -> PlacedFiles:
        """A remote source, fetched and validated into the download cache."""
        # Always fetched: a cache entry found by the weights' sha256 alone would pin the
        # config of whoever registered those weights first (review M4).
        with storage_errors(), self.cache.staging() as tmp:
            fetched = self.sources.fetch(source, tmp, max_bytes=self._download_cap())
            spec = self._inspect(tmp, name, sha256)
            created = self.cache.get(spec.content_digest) is None
            cached = self.cache.put(tmp, spec.content_digest)
            self.verified.add(str(cached))
        return PlacedFiles(spec, source.pinned(fetched), cached, created)

    def discard(self, placed: PlacedFiles) -> None:
        """Undo `store` or `download` after the version could not be recorded."""
        digest = placed.spec.content_digest
        if not placed.created or self._referenced(digest):
            return
        if placed.path.parent == self._uploads:
            shutil.rmtree(placed.path, ignore_errors=True)
        else:
            self.cache.remove(digest)

    def _download_cap(self) -> int:
        """Weights above the adapter cap, or above the whole cache's, are refused (413)
        as soon as the download passes it."""
        return min(self._max_bytes, self.cache.max_bytes)

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
        if path.parent != self._uploads or str(path) not in self.verified:
            # (Versions recorded before sources were copied into the store are read in
            # place, so they are checked at every load, as they were then.)
            self._verify(path, version)
            if path.parent == self._uploads:
                self.verified.add(str(path))
        return path

    def _cached_files(self, version: VersionRecord) -> Path:
        path = self.cache.get(version.content_digest)
        if path is not None and str(path) not in self.verified:
            try:
                self._verify(path, version)
                self.verified.add(str(path))
            except SourceChanged:
                log.warning("%s: cached files damaged; fetching them again", _label(version))
                self.cache.remove(version.content_digest)
                path = None
        if path is None:
            path = self._fetch_again(version)
        self.verified.add(str(path))
        return path

    def _fetch_again(self, version: VersionRecord) -> Path:
        """A download no longer in the cache, fetched from its pinned source and verified."""
        try:
            source = self.sources.parse(version.source)
            with storage_errors(), self.cache.staging() as tmp:
                self.sources.fetch(source, tmp, max_bytes=self._download_cap())
                self._verify(tmp, version)
                return self.cache.put(tmp, version.content_digest)
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

    # -- removal -----------------------------------------------------------------------

    def forget(self, version: VersionRecord) -> None:
        """`version` was deleted: its files go once unused (see below)."""
        # Files we own (whatever lies under storage_dir: uploads, downloads) go once no
        # version references that content and no running request reads it (the engine
        # may re-read a folder while it serves from it); a local folder registered before
        # sources were copied into the store belongs to its owner and is never touched.
        digest = version.content_digest
        path = Path(version.path)
        if self._referenced(digest) or not path.is_relative_to(self.storage_dir):
            return
        if digest in self.cache.in_use():
            with self._lock:
                self._orphans.setdefault(digest, set()).add(path)
            return
        self._remove(digest, {path})

    def _remove(self, digest: str, paths: set[Path]) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
            self.verified.discard(str(path))
        # A download may have been evicted and fetched again meanwhile: under this key.
        self.cache.remove(digest)

    @property
    def pending_removal(self) -> bool:
        """Whether some deleted version's files wait for their last reader."""
        return bool(self._orphans)

    def release(self) -> list[str]:
        """Remove the files of deleted versions that nothing reads any more; their
        digests."""
        if not self._orphans:
            return []
        in_use = self.cache.in_use()
        with self._lock:
            # Referenced again (re-registered meanwhile): its files are live, not orphans.
            for digest in [d for d in self._orphans if self._referenced(d)]:
                del self._orphans[digest]
            done = {d: self._orphans.pop(d) for d in list(self._orphans) if d not in in_use}
        for digest, paths in sorted(done.items()):
            self._remove(digest, paths)
        return sorted(done)


def _label(version: VersionRecord) -> str:
    return f"{version.adapter}@{version.version}"


def _changed(version: VersionRecord) -> str:
    return (
        f"{_label(version)}: its files changed or vanished at the source since "
        "registration; register a new version"
    )
