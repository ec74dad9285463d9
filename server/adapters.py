"""Model name -> what serves it, and the life of adapter versions inside the engine.

Accepted names: `<base>` (no adapter), `<base>:<name>` (as SGLang and Ray Serve LLM spell
it) and a bare `<name>` (as vLLM and the Kubernetes inference gateway send it), where
`<name>` is a registered adapter, an alias, or a folder of the adapters directory
(registered on first use).

Hot swap: a request resolves the adapter's *current* version once, up front, and holds a
lease on it until its last token; a version that is no longer reachable (not current, not
pinned by an alias) is removed from the engine when its last lease ends. Every version
gets its own vLLM LoRA id, never reused, so the engine can never serve old weights under a
new version's name.

What is resident is keyed by `(name, version, content digest)` (weights and config, see
adapters_registry/digest.py), and vLLM's `lora_name` carries the digest too: even if a
`name@N` came to name other content (a registry restored from a backup, another replica's
stale snapshot), no cache of any layer (this table, the engine's LoRA cache, vLLM's
prefix cache, which keys on the LoRA name) can serve one content for the other.

Residency: the engine keeps at most `max_cpu_loras` adapters (vLLM's own LRU beyond), so
the router holds no more (`max_resident`): loading one more removes the least recently
used idle version first, never one a request is running on. What the router holds is
what the download cache protects from eviction; when the cache has no room for a
download, idle versions give theirs up, and if every cached adapter is in use the
request gets 503 `adapter_cache_full` with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_registry import (
    AdapterError,
    AdapterNotFound,
    AlreadyExists,
    CacheFull,
    DirectoryCatalog,
    InvalidAdapterName,
    PathOutsideRoots,
)
from adapters_registry.ab import choose
from adapters_registry.records import AdapterRecord, VersionRecord
from adapters_registry.registry import Registry, usable_by
from adapters_registry.sources import is_url
from server.engine.base import Engine, LoraHandle
from server.errors import ModelNotFound
from server.metrics import Metrics

log = logging.getLogger("loraswap.adapters")

# Encoded /v1/models bodies kept (one per tenant asking; ~110 bytes per adapter each).
_MAX_BODIES = 64


@dataclass(frozen=True)
class Target:
    model: str  # canonical: `<base>` or `<base>:<adapter or alias>`
    version: VersionRecord | None = None
    alias: str | None = None
    variant: str | None = None  # the alias arm, e.g. "pirate@3"


@dataclass
class _Loaded:
    handle: LoraHandle
    version: VersionRecord
    leases: int = 0
    evict: bool = False  # unload() asked for it: leave the engine when the last lease ends


class AdapterRouter:
    def __init__(
        self,
        base_name: str,
        registry: Registry,
        catalog: DirectoryCatalog | None,
        engine: Engine,
        metrics: Metrics | None = None,
        max_resident: int | None = None,
    ) -> None:
        """`max_resident`: versions held in the engine at most (the engine's
        `max_cpu_loras`); None = no bound."""
        self._base = base_name
        self._metrics = metrics or Metrics()
        self.registry = registry
        self._catalog = catalog
        self._engine = engine
        self._max_resident = max_resident
        self._ids = itertools.count(1)
        # Versions in the engine, least recently used first.
        self._loaded: OrderedDict[Key, _Loaded] = OrderedDict()
        # content digest -> loads under way: their files must survive until loaded.
        self._loading: dict[str, int] = {}
        # The download cache keeps what the engine may still read: what this router holds.
        registry.cache.in_use = self.in_use_shas
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[object]] = set()  # lease endings' engine removals
        # /v1/models' names of registered adapters and aliases, per tenant, for one
        # registry generation: listing 10,000 adapters is computed once per change.
        self._names: dict[str | None, tuple[list[str], list[str], frozenset[str]]] = {}
        self._names_generation = -1
        # /v1/models' encoded bodies for this generation, least recently used first, keyed
        # by tenant and the adapters-directory folders not registered yet.
        self._bodies: OrderedDict[tuple[str | None, tuple[str, ...]], bytes] = OrderedDict()
        self._bodies_generation = -1
        # Versions reachable by other means than the registry: an alias's shadow adapter
        # pinned to a version (server/experiments/shadow.py) stays loaded between runs.
        self.also_reachable: Callable[[str, int], bool] = lambda _name, _version: False

    @property
    def base_name(self) -> str:
        return self._base

    async def model_names(self, tenant: str | None = None) -> tuple[list[str], list[str]]:
        """(adapter names, alias names) that /v1/models lists for `tenant`. Callers must
        not modify the lists (they are cached until the registry changes)."""
        return self._names_with(tenant, await self._unregistered_folders(tenant))

    def _names_with(
        self, tenant: str | None, folders: tuple[str, ...]
    ) -> tuple[list[str], list[str]]:
        adapters, aliases, _ = self._registered_names(tenant)
        if folders:
            adapters = sorted(set(folders).union(adapters))
        return adapters, aliases

    async def models_body(
        self, tenant: str | None, render: Callable[[list[str], list[str]], bytes]
    ) -> bytes:
        """/v1/models' encoded body for `tenant`: `render(*model_names(tenant))`, computed
        once per registry generation (and set of unregistered folders), so that listing
        10,000 adapters again costs a dictionary lookup; at most _MAX_BODIES are kept."""
        folders = await self._unregistered_folders(tenant)
        generation = self.registry.generation
        if generation != self._bodies_generation:
            self._bodies.clear()
            self._bodies_generation = generation
        key = (tenant, folders)
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = render(*self._names_with(tenant, folders))
            while len(self._bodies) > _MAX_BODIES:
                self._bodies.popitem(last=False)
        else:
            self._bodies.move_to_end(key)
        return body

    async def _unregistered_folders(self, tenant: str | None) -> tuple[str, ...]:
        """Adapters-directory folders not registered yet (shared once they are: see
        _discover), sorted; they change without the registry changing. The folder is
        read once per call, on a worker thread (review L6)."""
        if self._catalog is None:
            return ()
        names = await asyncio.to_thread(self._catalog.names)
        taken = self._registered_names(tenant)[2]
        return tuple(name for name in names if name not in taken)

    def _registered_names(self, tenant: str | None) -> tuple[list[str], list[str], frozenset[str]]:
        generation = self.registry.generation
        if generation != self._names_generation or len(self._names) > 1024:
            self._names, self._names_generation = {}, generation
        cached = self._names.get(tenant)
        if cached is None:
            registered = self.registry.adapters()
            all_aliases = self.registry.aliases()
            cached = (
                [
                    a.name
                    for a in registered
                    if a.current_version is not None and usable_by(a, tenant)
                ],
                [a.name for a in all_aliases if usable_by(a, tenant)],
                frozenset(a.name for a in registered) | {a.name for a in all_aliases},
            )
            self._names[tenant] = cached
        return cached

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

    # -- resolution --------------------------------------------------------------------

    def split(self, model: str) -> str | None:
        """The adapter/alias part of `model` (None for the base); raises ModelNotFound."""
        if model == self._base:
            return None
        base, sep, name = model.partition(":")
        if sep:
            if base != self._base or not name:
                raise _not_found(model)
            return name
        return model

    async def resolve(
        self, model: str, user: str | None = None, tenant: str | None = None
    ) -> Target:
        """What serves `model` for `tenant` (None: the operator, or open mode). Nothing is
        downloaded or loaded here: that waits for admission (see `acquire`).

        A tenant asking for another tenant's private adapter or alias gets exactly the
        404 of a name that does not exist: no existence leak.
        """
        name = self.split(model)
        if name is None:
            return Target(model=self._base)
        alias = self.registry.alias(name)
        if alias is not None:
            if not usable_by(alias, tenant):
                raise _not_found(model)
            variant = choose(alias.name, alias.variants, user)
            version = await self._version(variant.adapter, variant.version, model, tenant)
            return Target(
                model=f"{self._base}:{alias.name}",
                version=version,
                alias=alias.name,
                variant=variant.key,
            )
        version = await self._version(name, None, model, tenant)
        return Target(model=f"{self._base}:{name}", version=version)

    async def version_of(self, name: str, number: int | None, tenant: str | None) -> Target:
        """Adapter `name` (version `number`, None: the current one) as `tenant` may use
        it, as a target of its own (an alias's shadow); raises ModelNotFound."""
        model = f"{self._base}:{name}"
        version = await self._version(name, number, model, tenant)
        return Target(model=model, version=version)

    async def _version(
        self, name: str, number: int | None, model: str, tenant: str | None
    ) -> VersionRecord:
        record = self.registry.adapter(name)
        if record is not None and not usable_by(record, tenant):
            # The work an absent name costs (a look in the adapters folder, on a worker
            # thread), so that the answer's timing does not tell another tenant's private
            # name from one that does not exist (review M8).
            if self._catalog is not None:
                with contextlib.suppress(AdapterError):
                    await asyncio.to_thread(self._catalog.get, name)
            raise _not_found(model)
        if record is None or self._discovered(record):
            record = await self._discover(name, model, record)
        version = record.current if number is None else record.version(number)
        if version is None:
            raise _not_found(model)
        return version

    def _discovered(self, record: AdapterRecord) -> bool:
        """Whether `record` follows a folder of the adapters directory: only if registered
        by discovery (a flag stored with it), never when an admin registered it from a
        folder that happens to be there (review M9; registered before the flag: unknown)."""
        if self._catalog is None or record.discovered is False:
            return False
        # Discovered (or unknown): it follows the folder while its current version is
        # from there; an admin swap to a version from elsewhere takes it over, a rollback
        # hands it back.
        current = record.current
        return current is not None and Path(current.source).parent == self._catalog.root

    async def _discover(self, name: str, model: str, record: AdapterRecord | None) -> AdapterRecord:
        """Adapters-directory folders are registered on first use, and follow their folder:
        new weights there become a new current version (the folder is their control
        plane). Validation comes first; the catalog caches it until the files change.
        """
        if self._catalog is None:
            raise _not_found(model)
        try:
            spec = await asyncio.to_thread(self._catalog.get, name)
        except (AdapterNotFound, InvalidAdapterName, PathOutsideRoots):
            # A name that cannot exist is simply not found: nothing about the filesystem
            # behind it reaches the client.
            raise _not_found(model) from None
        except AdapterError as exc:
            exc.param = "model"
            raise
        if (
            record is not None
            and record.current is not None
            and record.current.content_digest == spec.content_digest
        ):
            return record
        async with self._lock(name):
            record = self.registry.adapter(name)
            if record is None:
                # AlreadyExists: registered meanwhile (e.g. through the admin API).
                with contextlib.suppress(AlreadyExists):
                    # The operator put it in the served folder: every tenant may use it.
                    await asyncio.to_thread(
                        self.registry.register,
                        name,
                        str(spec.path),
                        sha256=spec.sha256,
                        shared=True,
                        discovered=True,
                    )
            elif record.current is None or record.current.content_digest != spec.content_digest:
                await asyncio.to_thread(
                    self.registry.register, name, str(spec.path), sha256=spec.sha256, create=False
                )
                # The version it replaces may sit idle in the engine: no lease will end on
                # it to release it (see lease), so look now, as admin swaps do.
                await self.release_unreachable()
            record = self.registry.adapter(name)
        if record is None:
            raise _not_found(model)
        return record

    # -- engine residency --------------------------------------------------------------

    async def _ensure_loaded(self, version: VersionRecord) -> LoraHandle:
        key = _key(version)
        entry = self._loaded.get(key)
        if entry is not None:
            self._loaded.move_to_end(key)
            return entry.handle
        # One lock per adapter: concurrent first requests load it once.
        async with self._lock(version.adapter):
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

    async def acquire(self, target: Target) -> Lease:
        """Hold `target`'s version in the engine for one request, loading it if needed;
        `Lease.release` (synchronous, idempotent) lets it go when the response is over.

        The version may have been released between resolve and here (a swap raced us):
        then it is loaded again, under a new id, and the request still runs on exactly
        the version it resolved to.
        """
        if target.version is None:
            return Lease(self, None, None)
        key = _key(target.version)
        entry = self._loaded.get(key)
        while entry is None:
            await self._ensure_loaded(target.version)
            entry = self._loaded.get(key)
        entry.leases += 1
        self._loaded.move_to_end(key)
        return Lease(self, key, entry)

    @asynccontextmanager
    async def lease(self, target: Target) -> AsyncIterator[LoraHandle | None]:
        """`acquire` and release around a block."""
        held = await self.acquire(target)
        try:
            yield held.handle
        finally:
            held.release()

    def _end_lease(self, key: Key, entry: _Loaded) -> None:
        entry.leases -= 1
        if entry.leases:
            return
        # Removal awaits the engine. It runs as its own task, so that a cancelled request
        # (a client gone) cannot interrupt it half-way and leave the router and the engine
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
        if not (self.registry.is_referenced(name, number) or self.also_reachable(name, number)):
            return False
        record = self.registry.adapter(name)
        version = record.version(number) if record is not None else None
        return version is not None and version.content_digest == digest

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


# What the engine holds: (adapter, version, content digest).
Key = tuple[str, int, str]


def _key(version: VersionRecord) -> Key:
    return (version.adapter, version.version, version.content_digest)


def _same_content(version: VersionRecord, digest: str) -> bool:
    # Routing keys carry a prefix of the digest (server/placement.py).
    return version.content_digest.startswith(digest)


class Lease:
    """One request's hold on an adapter version (none for the base)."""

    def __init__(self, router: AdapterRouter, key: Key | None, entry: _Loaded | None) -> None:
        self._router = router
        self._key = key
        self._entry = entry
        self.handle = entry.handle if entry is not None else None

    def release(self) -> None:
        if self._key is not None and self._entry is not None:
            key, entry = self._key, self._entry
            self._key = self._entry = None
            self._router._end_lease(key, entry)


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model}' does not exist", param="model")
