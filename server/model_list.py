"""The names /v1/models lists, per tenant, cached per registry generation: listing 10,000
adapters again costs a dictionary lookup."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from adapters_registry import DirectoryCatalog
from adapters_registry.registry import Registry
from adapters_registry.tenants import usable_by

# Encoded /v1/models bodies kept (one per tenant asking; ~110 bytes per adapter each).
_MAX_BODIES = 64


class ModelList:
    def __init__(self, registry: Registry, catalog: DirectoryCatalog | None) -> None:
        self._registry = registry
        self._catalog = catalog
        # Names of registered adapters and aliases, per tenant, for one registry
        # generation: listing 10,000 adapters is computed once per change.
        self._names: dict[str | None, tuple[list[str], list[str], frozenset[str]]] = {}
        self._names_generation = -1
        # Encoded bodies for this generation, least recently used first, keyed by tenant
        # and the adapters-directory folders not registered yet.
        self._bodies: OrderedDict[tuple[str | None, tuple[str, ...]], bytes] = OrderedDict()
        self._bodies_generation = -1

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
        generation = self._registry.generation
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
        server/names.py), sorted; they change without the registry changing. The folder
        is read once per call, on a worker thread (review L6)."""
        if self._catalog is None:
            return ()
        names = await asyncio.to_thread(self._catalog.names)
        taken = self._registered_names(tenant)[2]
        return tuple(name for name in names if name not in taken)

    def _registered_names(self, tenant: str | None) -> tuple[list[str], list[str], frozenset[str]]:
        generation = self._registry.generation
        if generation != self._names_generation or len(self._names) > 1024:
            self._names, self._names_generation = {}, generation
        cached = self._names.get(tenant)
        if cached is None:
            registered = self._registry.adapters()
            all_aliases = self._registry.aliases()
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
