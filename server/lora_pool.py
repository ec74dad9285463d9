"""The life of adapter versions inside the engine: residency, leases, release.

Hot swap: a request resolves the adapter's *current* version once, up front
(server/names.py), and holds a lease on it until its last token; a version that is no
longer reachable (not current, not pinned by an alias) is removed from the engine when its
last lease ends. Every version gets its own vLLM LoRA id, never reused, so the engine can
never serve old weights under a new version's name.

What is resident is keyed by `(name, version, content digest)` (weights and config, see
adapters_registry/digest.py), and vLLM's `lora_name` carries the digest too: even if a
`name@N` came to name other content (a registry restored from a backup, another replica's
stale snapshot), no cache of any layer (this table, the engine's LoRA cache, vLLM's
prefix cache, which keys on the LoRA name) can serve one content for the other.

Residency: the engine keeps at most `max_cpu_loras` adapters (vLLM's own LRU beyond), so
the pool holds no more (`max_resident`): loading one more removes the least recently
used idle version first, never one a request is running on. What the pool holds is
what the download cache protects from eviction; when the cache has no room for a
download, idle versions give theirs up, and if every cached adapter is in use the
request gets 503 `adapter_cache_full` with Retry-After.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_registry import AdapterNotFound, CacheFull
from adapters_registry.records import VersionRecord
from adapters_registry.registry import Registry
from adapters_registry.sources import is_url
from server.engine.base import Engine, LoraHandle
from server.metrics import Metrics

log = logging.getLogger("loraswap.adapters")

# What the engine holds: (adapter, version, content digest).
Key = tuple[str, int, str]


@dataclass
class _Loaded:
    handle: LoraHandle
    version: VersionRecord
    leases: int = 0
    evict: bool = False  # unload() asked for it: leave the engine when the last lease ends


class LoraPool:
    """The versions held in the engine, least recently used first, and their leases."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        metrics: Metrics | None = None,
        max_resident: int | None = None,
    ) -> None:
        """`max_resident`: versions held in the engine at most (the engine's
        `max_cpu_loras`); None = no bound."""
        self._metrics = metrics or Metrics()
        self.registry = registry
        self._engine = engine
        self._max_resident = max_resident
        self._ids = itertools.count(1)
        # Versions in the engine, least recently used first.
        self._loaded: OrderedDict[Key, _Loaded] = OrderedDict()
        # content digest -> loads under way: their files must survive until loaded.
        self._loading: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[object]] = set()  # lease endings' engine removals
        # Who else keeps a version reachable besides the registry (see add_reachable).
        self._also_reachable: list[Callable[[str, int], bool]] = []
        # The download cache keeps what the engine may still read: what the pool holds.
        registry.cache.add_reader(self.in_use_shas)

    def add_reachable(self, reachable: Callable[[str, int], bool]) -> None:
        """Keep versions `reachable(adapter, version)` names loaded while idle, as the
        registry's current and alias-pinned ones are (e.g. an alias's shadow adapter
        pinned to a version, server/experiments/shadow.py)."""
        self._also_reachable.append(reachable)

    def loaded(self) -> list[tuple[LoraHandle, int]]:
        """(handle, running requests) of every version held in the engine."""
        return [(entry.handle, entry.leases) for entry in self._loaded.values()]

    def is_loaded(self, adapter: str, version: int) -> bool:
        return any(
            key[:2] == (adapter, version) and not entry.evict
            for key, entry in list(self._loaded.items())
        )

    def in_use_shas(self) -> set[str]:
        """Content digests (the registry's file keys) the engine may read: held versions
        and those being loaded. Called from worker threads: reads copies, taken in one
        step each."""
        return {entry.version.content_digest for entry in list(self._loaded.values())} | set(
            list(self._loading)
        )

    async def _ensure_loaded(self, version: VersionRecord) -> LoraHandle:
        key = _key(version)
        entry = self._loaded.get(key)
        if entry is not None:
            self._loaded.move_to_end(key)
            return entry.handle
        # One lock per adapter: concurrent first requests load it once.
        async with self._locks.setdefault(version.adapter, asyncio.Lock()):
            entry = self._loaded.get(key)
            if entry is None:
                entry = await self._load(key, version)
                await self._trim(keep=key)
            else:
                self._loaded.move_to_end(key)
        return entry.handle

    async def _load(self, key: Key, version: VersionRecord) -> _Loaded:
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
            entry = self._loaded[key] = _Loaded(handle=handle, version=version)
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
        cache = self.registry.cache
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
                return await asyncio.to_thread(self.registry.local_files, version)
            except CacheFull:
                if not await self._release_idle(keep=key, cached_only=True):
                    raise

    async def _trim(self, keep: Key) -> None:
        """Hold at most `max_resident` versions (what the engine keeps)."""
        if self._max_resident is None:
            return
        while len(self._loaded) > self._max_resident:
            if not await self._release_idle(keep=keep):
                return  # the rest run requests (or are pinned): they stay

    async def _release_idle(self, *, keep: Key, cached_only: bool = False) -> bool:
        """Remove the least recently used idle, unpinned version (other than `keep`; with
        `cached_only`, one whose files are in the download cache) from the engine."""
        for key, entry in self._loaded.items():
            if key == keep or entry.leases:
                continue
            record = self.registry.adapter(key[0])
            if record is not None and record.pinned:
                continue
            if cached_only and not (
                is_url(entry.version.source)
                and self.registry.cache.has(entry.version.content_digest)
            ):
                continue
            await self._remove(key, entry)
            return True
        return False

    async def _remove(self, key: Key, entry: _Loaded) -> None:
        if self._loaded.get(key) is not entry:
            return  # already removed (e.g. unload() and a lease ending raced)
        # Out of the table first: a request arriving meanwhile loads it again, afresh.
        del self._loaded[key]
        try:
            await self._engine.remove_lora(entry.handle.lora_id)
        except Exception:
            # An adapter left resident only costs memory, and vLLM's own LRU will evict it.
            log.warning("could not remove %s from the engine", entry.handle.name, exc_info=True)
        self._metrics.adapter_evictions.inc()
        # A deleted version's files wait for the last reader (review L5): maybe this one.
        if self.registry.files_pending_removal:
            await asyncio.to_thread(self.registry.release_files)

    async def warm(self, name: str) -> LoraHandle:
        record = self.registry.adapter(name)
        if record is None or record.current is None:
            raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
        handle = await self._ensure_loaded(record.current)
        if record.pinned:
            await self._engine.pin_lora(handle.lora_id)
        return handle

    async def load(self, adapter: str, version: int, digest: str | None = None) -> LoraHandle:
        """Put one concrete version in the engine (a placement policy choosing what each
        replica holds, see server/ray_serve.py); raises AdapterNotFound if it is gone, or
        if `digest` is given and the version is not that content (a stale routing key)."""
        record = self.registry.adapter(adapter)
        found = record.version(version) if record is not None else None
        if found is None or (digest is not None and not _same_content(found, digest)):
            raise AdapterNotFound(f"adapter {adapter}@{version} not found", adapter=adapter)
        handle = await self._ensure_loaded(found)
        self._loaded[_key(found)].evict = False
        return handle

    async def unload(self, adapter: str, version: int, digest: str | None = None) -> None:
        """Take a version out of the engine even though it is reachable (the placement
        policy moved it elsewhere): now if idle, else when its last lease ends. A later
        request for it loads it again. `digest` (a prefix is enough) limits it to that
        content."""
        for key, entry in list(self._loaded.items()):
            if key[:2] != (adapter, version):
                continue
            if digest is not None and not key[2].startswith(digest):
                continue
            entry.evict = True
            if entry.leases == 0:
                await self._remove(key, entry)

    async def acquire(self, version: VersionRecord | None) -> Lease:
        """Hold `version` in the engine for one request, loading it if needed (None: the
        base model, nothing to hold); `Lease.release` (synchronous, idempotent) lets it go
        when the response is over.

        The version may have been released between resolve and here (a swap raced us):
        then it is loaded again, under a new id, and the request still runs on exactly
        the version it resolved to.
        """
        if version is None:
            return Lease(self, None, None)
        key = _key(version)
        entry = self._loaded.get(key)
        while entry is None:
            await self._ensure_loaded(version)
            entry = self._loaded.get(key)
        entry.leases += 1
        self._loaded.move_to_end(key)
        return Lease(self, key, entry)

    @asynccontextmanager
    async def lease(self, version: VersionRecord | None) -> AsyncIterator[LoraHandle | None]:
        """`acquire` and release around a block."""
        held = await self.acquire(version)
        try:
            yield held.handle
        finally:
            held.release()

    def _end_lease(self, key: Key, entry: _Loaded) -> None:
        entry.leases -= 1
        if entry.leases:
            return
        # Removal awaits the engine. It runs as its own task, so that a cancelled request
        # (a client gone) cannot interrupt it half-way and leave the pool and the engine
        # disagreeing about what is resident.
        # Only this version can have become releasable by this request ending (unless
        # evicted): the others change reachability on registry writes, which release
        # them. O(1), whatever the size of the registry or of the engine's residents.
        work: Coroutine[Any, Any, object] = (
            self._remove(key, entry) if entry.evict else self.release_unreachable([key])
        )
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the engine removals that ended leases started (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    async def release_unreachable(self, keys: Iterable[Key] | None = None) -> list[str]:
        """Remove idle versions that no new request can reach (called after swaps too);
        `keys` limits the look to those versions (default: every loaded one)."""
        released = []
        candidates = list(self._loaded) if keys is None else list(keys)
        for key in candidates:
            entry = self._loaded.get(key)
            if entry is None:
                continue
            if entry.leases == 0 and not self._reachable(key):
                await self._remove(key, entry)
                released.append(entry.handle.name)
        return released

    def _reachable(self, key: Key) -> bool:
        """Whether new requests can still reach this content: its version is referenced
        and still is this content (a deleted and re-created name never reuses a number,
        but the check costs nothing and holds whatever the registry's history)."""
        name, number, digest = key
        if not (
            self.registry.is_referenced(name, number)
            or any(reachable(name, number) for reachable in self._also_reachable)
        ):
            return False
        record = self.registry.adapter(name)
        version = record.version(number) if record is not None else None
        return version is not None and version.content_digest == digest


def _key(version: VersionRecord) -> Key:
    return (version.adapter, version.version, version.content_digest)


def _same_content(version: VersionRecord, digest: str) -> bool:
    # Routing keys carry a prefix of the digest (server/placement.py).
    return version.content_digest.startswith(digest)


class Lease:
    """One request's hold on an adapter version (none for the base)."""

    def __init__(self, pool: LoraPool, key: Key | None, entry: _Loaded | None) -> None:
        self._pool = pool
        self._key = key
        self._entry = entry
        self.handle = entry.handle if entry is not None else None

    def release(self) -> None:
        if self._key is not None and self._entry is not None:
            key, entry = self._key, self._entry
            self._key = self._entry = None
            self._pool._end_lease(key, entry)
