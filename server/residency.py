"""What the engine holds: adapter versions loaded into it, least recently used first,
within its bound, and which of them make room when a load or a download needs it.

Residency: the engine keeps at most `max_cpu_loras` adapters (vLLM's own LRU beyond), so
no more are held (`max_resident`): loading one more removes the least recently used idle
version first, never one a request is running on. What is held is what the download
cache protects from eviction; when the cache has no room for a download, idle versions
give theirs up, and if every cached adapter is in use the request gets 503
`adapter_cache_full` with Retry-After.

Leases (who is running on what) and when a version is no longer reachable are
lora_pool.py's; a version's lease count lives here, on its entry, because "idle" is what
eviction asks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from adapters_registry import CacheFull
from adapters_registry.records import VersionRecord
from adapters_registry.registry import Registry
from adapters_registry.sources import is_url
from server.engine.base import Engine, LoraHandle
from server.metrics import Metrics

log = logging.getLogger("loraswap.adapters")

# What the engine holds: (adapter, version, content digest).
Key = tuple[str, int, str]


def key_of(version: VersionRecord) -> Key:
    return (version.adapter, version.version, version.content_digest)


@dataclass
class Resident:
    handle: LoraHandle
    version: VersionRecord
    leases: int = 0
    evict: bool = False  # unload() asked for it: leave the engine when the last lease ends


class Residency:
    """The versions held in the engine, least recently used first."""

    def __init__(
        self, registry: Registry, engine: Engine, metrics: Metrics, max_resident: int | None
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._metrics = metrics
        self._max_resident = max_resident
        # vLLM LoRA ids: one per load, never reused (see lora_pool.py).
        self._ids = itertools.count(1)
        # Versions in the engine, least recently used first.
        self.held: OrderedDict[Key, Resident] = OrderedDict()
        # content digest -> loads under way: their files must survive until loaded.
        self._loading: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # The download cache keeps what the engine may still read: what is held here.
        registry.cache.add_reader(self.in_use_shas)

    def in_use_shas(self) -> set[str]:
        """Content digests (the registry's file keys) the engine may read: held versions
        and those being loaded. Called from worker threads: reads copies, taken in one
        step each."""
        return {entry.version.content_digest for entry in list(self.held.values())} | set(
            list(self._loading)
        )

    def used(self, key: Key) -> None:
        """Mark a held version as the most recently used."""
        self.held.move_to_end(key)

    async def ensure_loaded(self, version: VersionRecord) -> Resident:
        key = key_of(version)
        entry = self.held.get(key)
        if entry is not None:
            self.held.move_to_end(key)
            return entry
        # One lock per adapter: concurrent first requests load it once.
        async with self._locks.setdefault(version.adapter, asyncio.Lock()):
            entry = self.held.get(key)
            if entry is None:
                entry = await self._load(key, version)
                await self._trim(keep=key)
            else:
                self.held.move_to_end(key)
        return entry

    async def _load(self, key: Key, version: VersionRecord) -> Resident:
        done = self._metrics.load_timer(version.adapter)
        sha = version.content_digest
        self._loading[sha] = self._loading.get(sha, 0) + 1
        try:
            path = await self._local_files(key, version)
            handle = LoraHandle(
                name=f"{version.adapter}@{version.version}",
                lora_id=next(self._ids),
                path=str(path),
                digest=version.content_digest,
            )
            await self._engine.add_lora(handle)
            entry = self.held[key] = Resident(handle=handle, version=version)
        except Exception as exc:
            done(exc)
            raise
        finally:
            self._loading[sha] -= 1
            if not self._loading[sha]:
                del self._loading[sha]
        done(None)
        return entry

    async def _local_files(self, key: Key, version: VersionRecord) -> Path:
        """The version's verified folder. A download needs room in the cache: idle versions
        give theirs up (least recently used first) before it starts, and after it if that
        was not enough; with every cached adapter in use, CacheFull (503, Retry-After)."""
        cache = self._registry.cache
        size = version.size_bytes
        # (Larger than the whole cache: local_files refuses it with 413.)
        if (
            is_url(version.source)
            and size <= cache.max_bytes
            and not cache.has(version.content_digest)
        ):
            while not await asyncio.to_thread(cache.fits, size):
                if not await self._release_idle(keep=key, cached_only=True):
                    # No download: its weights alone would not fit beside those in use.
                    raise CacheFull(
                        f"the download cache ({cache.max_bytes} bytes) is full of adapters "
                        "in use; try again shortly",
                        adapter=version.adapter,
                    )
        while True:
            try:
                return await asyncio.to_thread(self._registry.local_files, version)
            except CacheFull:
                if not await self._release_idle(keep=key, cached_only=True):
                    raise

    async def _trim(self, keep: Key) -> None:
        """Hold at most `max_resident` versions (what the engine keeps)."""
        if self._max_resident is None:
            return
        while len(self.held) > self._max_resident:
            if not await self._release_idle(keep=keep):
                return  # the rest run requests (or are pinned): they stay

    async def _release_idle(self, *, keep: Key, cached_only: bool = False) -> bool:
        """Remove the least recently used idle, unpinned version (other than `keep`; with
        `cached_only`, one whose files are in the download cache) from the engine."""
        for key, entry in self.held.items():
            if key == keep or entry.leases:
                continue
            record = self._registry.adapter(key[0])
            if record is not None and record.pinned:
                continue
            if cached_only and not (
                is_url(entry.version.source)
                and self._registry.cache.has(entry.version.content_digest)
            ):
                continue
            await self.remove(key, entry)
            return True
        return False

    async def remove(self, key: Key, entry: Resident) -> None:
        if self.held.get(key) is not entry:
            return  # already removed (e.g. unload() and a lease ending raced)
        # Out of the table first: a request arriving meanwhile loads it again, afresh.
        del self.held[key]
        try:
            await self._engine.remove_lora(entry.handle.lora_id)
        except Exception:
            # An adapter left resident only costs memory, and vLLM's own LRU will evict it.
            log.warning("could not remove %s from the engine", entry.handle.name, exc_info=True)
        self._metrics.adapter_evictions.inc()
        # A deleted version's files wait for the last reader (review L5): maybe this one.
        if self._registry.files_pending_removal:
            await asyncio.to_thread(self._registry.release_files)
