"""Model name -> what serves it, and the life of adapter versions inside the engine: the
composition of three parts with one job each, for the callers that need all three (the
app's state, the routes' RouterDep):

- `NameResolver` (server/names.py): names, aliases and their A/B arms, tenant access,
  adapters-directory discovery -> a Target.
- `LoraPool` (server/lora_pool.py): residency and leases in the engine; hot swap.
- `ModelList` (server/model_list.py): the /v1/models names and bodies, cached.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

from adapters_registry import DirectoryCatalog
from adapters_registry.registry import Registry
from server.engine.base import Engine, LoraHandle
from server.lora_pool import Key, Lease, LoraPool
from server.metrics import Metrics
from server.model_list import ModelList
from server.names import NameResolver, Target

__all__ = ["AdapterRouter", "Lease", "Target"]


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
        self.registry = registry
        self.catalog = catalog
        self.pool = LoraPool(registry, engine, metrics, max_resident)
        self.resolver = NameResolver(base_name, registry, catalog, self.pool.release_unreachable)
        self.models = ModelList(registry, catalog)

    @property
    def base_name(self) -> str:
        return self.resolver.base_name

    # -- names -------------------------------------------------------------------------

    def split(self, model: str) -> str | None:
        return self.resolver.split(model)

    async def resolve(
        self, model: str, user: str | None = None, tenant: str | None = None
    ) -> Target:
        return await self.resolver.resolve(model, user, tenant)

    async def version_of(self, name: str, number: int | None, tenant: str | None) -> Target:
        return await self.resolver.version_of(name, number, tenant)

    async def model_names(self, tenant: str | None = None) -> tuple[list[str], list[str]]:
        return await self.models.model_names(tenant)

    async def models_body(
        self, tenant: str | None, render: Callable[[list[str], list[str]], bytes]
    ) -> bytes:
        return await self.models.models_body(tenant, render)

    # -- the engine --------------------------------------------------------------------

    async def acquire(self, target: Target) -> Lease:
        return await self.pool.acquire(target.version)

    @asynccontextmanager
    async def lease(self, target: Target) -> AsyncIterator[LoraHandle | None]:
        async with self.pool.lease(target.version) as handle:
            yield handle

    def loaded(self) -> list[tuple[LoraHandle, int]]:
        return self.pool.loaded()

    def is_loaded(self, adapter: str, version: int) -> bool:
        return self.pool.is_loaded(adapter, version)

    def in_use_shas(self) -> set[str]:
        return self.pool.in_use_shas()

    async def warm(self, name: str) -> LoraHandle:
        return await self.pool.warm(name)

    async def load(self, adapter: str, version: int, digest: str | None = None) -> LoraHandle:
        return await self.pool.load(adapter, version, digest)

    async def unload(self, adapter: str, version: int, digest: str | None = None) -> None:
        await self.pool.unload(adapter, version, digest)

    async def release_unreachable(self, keys: Iterable[Key] | None = None) -> list[str]:
        return await self.pool.release_unreachable(keys)
