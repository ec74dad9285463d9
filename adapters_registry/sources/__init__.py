"""Where adapter files come from: one `Source` interface (base.py), one kind a module.

    local.py   a folder inside the allowed roots (copied into the registry's store)
    upload.py  files sent in the request (kept in the registry's store)
    http.py    http(s)://host/path/ under a network policy (download cache)
    s3.py      s3://bucket/prefix, object versions pinned (download cache)
    hf.py      hf://org/repo[@revision], commit pinned; off by default (download cache)
    cache.py   the capped LRU cache of downloads, and staging folders

`Sources` turns a source string into its kind (no caller branches on the kind) and runs
fetches in its own bounded pool of threads, each under the total deadline.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adapters_registry.errors import InvalidSource
from adapters_registry.sources.base import (
    ADAPTER_FILES,
    Deadline,
    Fetched,
    Source,
    SourcesConfig,
    fsync_dir,
    write_capped,
)
from adapters_registry.sources.cache import DiskCache, staging
from adapters_registry.sources.local import LocalSource
from adapters_registry.sources.upload import UploadSource

__all__ = [
    "ADAPTER_FILES",
    "Deadline",
    "DiskCache",
    "Fetched",
    "LocalSource",
    "Source",
    "Sources",
    "SourcesConfig",
    "UploadSource",
    "fsync_dir",
    "is_url",
    "staging",
    "write_capped",
]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
REMOTE_SCHEMES = frozenset({"http", "https", "s3", "hf"})


def scheme(source: str) -> str | None:
    match = _SCHEME.match(source)
    return match[1].lower() if match else None


def is_url(source: str) -> bool:
    """Whether a recorded source is fetched into the download cache (and can be fetched
    again after eviction), rather than kept in the registry's store."""
    return scheme(source) in REMOTE_SCHEMES


class Sources:
    """The kinds of source one registry accepts, with their settings and thread pool."""

    def __init__(self, config: SourcesConfig, roots: tuple[Path, ...]) -> None:
        from adapters_registry.sources.s3 import S3Clients

        self.config = config
        self.roots = roots
        self._s3 = S3Clients(config)
        self._pool = ThreadPoolExecutor(
            max_workers=config.download_workers, thread_name_prefix="adapter-download"
        )

    def parse(self, source: str) -> Source:
        kind = scheme(source)
        if kind is None:
            return LocalSource(source, self.roots)
        if kind in ("http", "https"):
            from adapters_registry.sources.http import HttpSource

            return HttpSource(source, self.config)
        if kind == "s3":
            from adapters_registry.sources.s3 import S3Source

            return S3Source(source, self.config, self._s3)
        if kind == "hf":
            from adapters_registry.sources.hf import HfSource

            return HfSource(source, self.config)
        raise InvalidSource(
            f"unsupported source scheme {kind!r}: use a path, http(s)://, s3:// or hf://"
        )

    def fetch(self, source: Source, dest: Path, *, max_bytes: int) -> Fetched:
        """`source.fetch` under the total deadline; downloads run in the bounded pool, so
        slow sources can hold only its threads (not the server's default executor)."""
        deadline = Deadline(self.config.download_timeout_s)
        if not source.remote:
            return source.fetch(dest, max_bytes=max_bytes, deadline=deadline)
        future = self._pool.submit(source.fetch, dest, max_bytes=max_bytes, deadline=deadline)
        # The fetch enforces the deadline itself (socket timeouts, checks between reads):
        # waiting for it means the staging folder is no longer written when we return.
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
