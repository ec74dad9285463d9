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
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from adapters_registry import (
    AdapterError,
    AdapterNotFound,
    AlreadyExists,
    DirectoryCatalog,
    InvalidAdapterName,
    PathOutsideRoots,
)
from adapters_registry.ab import choose
from adapters_registry.records import AdapterRecord, VersionRecord
from adapters_registry.registry import Registry, usable_by
from server.engine.base import Engine, LoraHandle
from server.errors import ModelNotFound
from server.metrics import Metrics

log = logging.getLogger("loraswap.adapters")


@dataclass(frozen=True)
class Target:
    model: str  # canonical: `<base>` or `<base>:<adapter or alias>`
    version: VersionRecord | None = None
    lora: LoraHandle | None = None
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
    ) -> None:
        self._base = base_name
        self._metrics = metrics or Metrics()
        self.registry = registry
        self._catalog = catalog
        self._engine = engine
        self._ids = itertools.count(1)
        self._loaded: dict[tuple[str, int], _Loaded] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # /v1/models' names of registered adapters and aliases, per tenant, for one
        # registry generation: listing 10,000 adapters is computed once per change.
        self._names: dict[str | None, tuple[list[str], list[str], frozenset[str]]] = {}
        self._names_generation = -1

    @property
    def base_name(self) -> str:
        return self._base

    def model_names(self, tenant: str | None = None) -> tuple[list[str], list[str]]:
        """(adapter names, alias names) that /v1/models lists for `tenant`. Callers must
        not modify the lists (they are cached until the registry changes)."""
        adapters, aliases, taken = self._registered_names(tenant)
        if self._catalog is not None:
            # Folders not registered yet are shared once they are (see _discover).
            folders = set(self._catalog.names()) - taken
            if folders:
                adapters = sorted(folders.union(adapters))
        return adapters, aliases

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
        entry = self._loaded.get((adapter, version))
        return entry is not None and not entry.evict

    def in_use_shas(self) -> set[str]:
        return {entry.version.sha256 for entry in self._loaded.values()}

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
        """What serves `model` for `tenant` (None: the operator, or open mode).

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
            lora = await self._ensure_loaded(version)
            return Target(
                model=f"{self._base}:{alias.name}",
                version=version,
                lora=lora,
                alias=alias.name,
                variant=variant.key,
            )
        version = await self._version(name, None, model, tenant)
        lora = await self._ensure_loaded(version)
        return Target(model=f"{self._base}:{name}", version=version, lora=lora)

    async def _version(
        self, name: str, number: int | None, model: str, tenant: str | None
    ) -> VersionRecord:
        record = self.registry.adapter(name)
        if record is not None and not usable_by(record, tenant):
            raise _not_found(model)
        if record is None or self._discovered(record):
            record = await self._discover(name, model, record)
        version = record.current if number is None else record.version(number)
        if version is None:
            raise _not_found(model)
        return version

    def _discovered(self, record: AdapterRecord) -> bool:
        """Whether `record` follows a folder of the adapters directory."""
        current = record.current
        return (
            self._catalog is not None
            and current is not None
            and Path(current.source).parent == self._catalog.root
        )

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
            and record.current.sha256 == spec.sha256
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
                    )
            elif record.current is None or record.current.sha256 != spec.sha256:
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
        key = (version.adapter, version.version)
        entry = self._loaded.get(key)
        if entry is not None:
            return entry.handle
        # One lock per adapter: concurrent first requests load it once.
        async with self._lock(version.adapter):
            entry = self._loaded.get(key)
            if entry is None:
                done = self._metrics.load_timer(version.adapter)
                try:
                    path = await asyncio.to_thread(self.registry.local_files, version)
                    handle = LoraHandle(
                        name=f"{version.adapter}@{version.version}",
                        lora_id=next(self._ids),
                        path=str(path),
                    )
                    await self._engine.add_lora(handle)
                except Exception as exc:
                    done(exc)
                    raise
                done(None)
                entry = self._loaded[key] = _Loaded(handle=handle, version=version)
        return entry.handle

    async def warm(self, name: str) -> LoraHandle:
        record = self.registry.adapter(name)
        if record is None or record.current is None:
            raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
        handle = await self._ensure_loaded(record.current)
        if record.pinned:
            await self._engine.pin_lora(handle.lora_id)
        return handle

    async def load(self, adapter: str, version: int) -> LoraHandle:
        """Put one concrete version in the engine (a placement policy choosing what each
        replica holds, see server/ray_serve.py); raises AdapterNotFound if it is gone."""
        record = self.registry.adapter(adapter)
        found = record.version(version) if record is not None else None
        if found is None:
            raise AdapterNotFound(f"adapter {adapter}@{version} not found", adapter=adapter)
        handle = await self._ensure_loaded(found)
        self._loaded[(adapter, version)].evict = False
        return handle

    async def unload(self, adapter: str, version: int) -> None:
        """Take a version out of the engine even though it is reachable (the placement
        policy moved it elsewhere): now if idle, else when its last lease ends. A later
        request for it loads it again."""
        entry = self._loaded.get((adapter, version))
        if entry is None:
            return
        entry.evict = True
        if entry.leases == 0:
            await self._remove((adapter, version), entry)

    @asynccontextmanager
    async def lease(self, target: Target) -> AsyncIterator[LoraHandle | None]:
        """Hold `target`'s version in the engine for one request; yields the handle to use.

        The version may have been released between resolve and here (a swap raced us):
        then it is loaded again, under a new id, and the request still runs on exactly
        the version it resolved to.
        """
        if target.version is None:
            yield None
            return
        key = (target.version.adapter, target.version.version)
        entry = self._loaded.get(key)
        while entry is None:
            await self._ensure_loaded(target.version)
            entry = self._loaded.get(key)
        entry.leases += 1
        try:
            yield entry.handle
        finally:
            entry.leases -= 1
            if entry.leases == 0 and entry.evict:
                await self._remove(key, entry)
            elif entry.leases == 0:
                # Only this version can have become releasable by this request ending: the
                # others change reachability on registry writes, which release them. O(1),
                # whatever the size of the registry or of the engine's residents.
                await self.release_unreachable([key])

    async def release_unreachable(self, keys: Iterable[tuple[str, int]] | None = None) -> list[str]:
        """Remove idle versions that no new request can reach (called after swaps too);
        `keys` limits the look to those versions (default: every loaded one)."""
        released = []
        candidates = list(self._loaded) if keys is None else list(keys)
        for key in candidates:
            entry = self._loaded.get(key)
            if entry is None:
                continue
            if entry.leases == 0 and not self.registry.is_referenced(*key):
                await self._remove(key, entry)
                released.append(entry.handle.name)
        return released

    async def _remove(self, key: tuple[str, int], entry: _Loaded) -> None:
        if self._loaded.get(key) is not entry:
            return
        del self._loaded[key]
        try:
            await self._engine.remove_lora(entry.handle.lora_id)
        except Exception:
            # The registry change it follows is already committed; an adapter left
            # resident only costs memory, and vLLM's own LRU will evict it.
            log.warning("could not remove %s from the engine", entry.handle.name, exc_info=True)
        self._metrics.adapter_evictions.inc()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model}' does not exist", param="model")
