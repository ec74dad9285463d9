"""The life of adapter versions inside the engine: leases, release, and the placement
policy's loads and unloads, over what the engine holds (server/residency.py).

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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from typing import Any

from adapters_registry import AdapterNotFound
from adapters_registry.records import VersionRecord
from adapters_registry.registry import Registry
from server.engine.base import Engine, LoraHandle
from server.metrics import Metrics
from server.residency import Key, Residency, Resident, key_of

# Key: where callers found it before residency.py owned it.
__all__ = ["Key", "Lease", "LoraPool"]


class LoraPool:
    """Who runs on which version held in the engine, and when a version leaves it."""

    def __init__(
        self,
        registry: Registry,
        engine: Engine,
        metrics: Metrics | None = None,
        max_resident: int | None = None,
    ) -> None:
        """`max_resident`: versions held in the engine at most (the engine's
        `max_cpu_loras`); None = no bound."""
        self.registry = registry
        self._engine = engine
        self._residency = Residency(registry, engine, metrics or Metrics(), max_resident)
        # The residents' table (residency.py's): requests' leases are counted on its entries.
        self._held = self._residency.held
        self.in_use_shas = self._residency.in_use_shas
        self._tasks: set[asyncio.Task[object]] = set()  # lease endings' engine removals
        # Who else keeps a version reachable besides the registry (see add_reachable).
        self._also_reachable: list[Callable[[str, int], bool]] = []

    def add_reachable(self, reachable: Callable[[str, int], bool]) -> None:
        """Keep versions `reachable(adapter, version)` names loaded while idle, as the
        registry's current and alias-pinned ones are (e.g. an alias's shadow adapter
        pinned to a version, server/experiments/shadow.py)."""
        self._also_reachable.append(reachable)

    def loaded(self) -> list[tuple[LoraHandle, int]]:
        """(handle, running requests) of every version held in the engine."""
        return [(entry.handle, entry.leases) for entry in self._held.values()]

    def is_loaded(self, adapter: str, version: int) -> bool:
        return any(
            key[:2] == (adapter, version) and not entry.evict
            for key, entry in list(self._held.items())
        )

    # -- the placement policy's commands -----------------------------------------------

    async def warm(self, name: str) -> LoraHandle:
        record = self.registry.adapter(name)
        if record is None or record.current is None:
            raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
        handle = (await self._residency.ensure_loaded(record.current)).handle
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
        handle = (await self._residency.ensure_loaded(found)).handle
        self._held[key_of(found)].evict = False
        return handle

    async def unload(self, adapter: str, version: int, digest: str | None = None) -> None:
        """Take a version out of the engine even though it is reachable (the placement
        policy moved it elsewhere): now if idle, else when its last lease ends. A later
        request for it loads it again. `digest` (a prefix is enough) limits it to that
        content."""
        for key, entry in list(self._held.items()):
            if key[:2] != (adapter, version):
                continue
            if digest is not None and not key[2].startswith(digest):
                continue
            entry.evict = True
            if entry.leases == 0:
                await self._residency.remove(key, entry)

    # -- leases --------------------------------------------------------------------------

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
        key = key_of(version)
        entry = self._held.get(key)
        while entry is None:
            await self._residency.ensure_loaded(version)
            entry = self._held.get(key)
        entry.leases += 1
        self._residency.used(key)
        return Lease(self, key, entry)

    @asynccontextmanager
    async def lease(self, version: VersionRecord | None) -> AsyncIterator[LoraHandle | None]:
        """`acquire` and release around a block."""
        held = await self.acquire(version)
        try:
            yield held.handle
        finally:
            held.release()

    def _end_lease(self, key: Key, entry: Resident) -> None:
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
            self._residency.remove(key, entry) if entry.evict else self.release_unreachable([key])
        )
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the engine removals that ended leases started (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))

    # -- release -------------------------------------------------------------------------

    async def release_unreachable(self, keys: Iterable[Key] | None = None) -> list[str]:
        """Remove idle versions that no new request can reach (called after swaps too);
        `keys` limits the look to those versions (default: every loaded one)."""
        released = []
        candidates = list(self._held) if keys is None else list(keys)
        for key in candidates:
            entry = self._held.get(key)
            if entry is None:
                continue
            if entry.leases == 0 and not self._reachable(key):
                await self._residency.remove(key, entry)
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


def _same_content(version: VersionRecord, digest: str) -> bool:
    # Routing keys carry a prefix of the digest (server/placement.py).
    return version.content_digest.startswith(digest)


class Lease:
    """One request's hold on an adapter version (none for the base)."""

    def __init__(self, pool: LoraPool, key: Key | None, entry: Resident | None) -> None:
        self._pool = pool
        self._key = key
        self._entry = entry
        self.handle = entry.handle if entry is not None else None

    def release(self) -> None:
        if self._key is not None and self._entry is not None:
            key, entry = self._key, self._entry
            self._key = self._entry = None
            self._pool._end_lease(key, entry)
