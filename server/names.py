"""Model name -> the adapter version that serves it (no engine, no residency: that is
server/lora_pool.py's).

Accepted names: `<base>` (no adapter), `<base>:<name>` (as SGLang and Ray Serve LLM spell
it) and a bare `<name>` (as vLLM and the Kubernetes inference gateway send it), where
`<name>` is a registered adapter, an alias, or a folder of the adapters directory
(registered on first use). `parse_model` and `pick` are the one reading of a name: the
replica resolves with them (`NameResolver`) and the Ray ingress routes with them
(server/placement.py, server/ingress.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
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
from adapters_registry.records import AdapterRecord, AliasRecord, VersionRecord
from adapters_registry.registry import Registry
from adapters_registry.tenants import usable_by
from server.errors import ModelNotFound


@dataclass(frozen=True)
class Target:
    model: str  # canonical: `<base>` or `<base>:<adapter or alias>`
    version: VersionRecord | None = None
    alias: str | None = None
    variant: str | None = None  # the alias arm, e.g. "pirate@3"


@dataclass(frozen=True)
class Pick:
    """What a name points at before any version is looked up: an adapter (and, through
    an alias arm, a pinned version number)."""

    adapter: str
    number: int | None = None  # None: the adapter's current version
    alias: AliasRecord | None = None
    variant: str | None = None


def parse_model(model: str, base: str) -> str | None:
    """The adapter/alias part of `model` (None for the base model); raises ModelNotFound
    for another base's name or an empty one (`<base>:`)."""
    if model == base:
        return None
    prefix, sep, name = model.partition(":")
    if sep:
        if prefix != base or not name:
            raise not_found(model)
        return name
    return model


def pick(registry: Registry, name: str, user: str | None) -> Pick:
    """The adapter (and version number) `name` stands for: an alias's sticky A/B arm for
    `user`, else the adapter of that name; raises ValueError for an alias without a live
    arm."""
    alias = registry.alias(name)
    if alias is None:
        return Pick(name)
    variant = choose(alias.name, alias.variants, user)
    return Pick(variant.adapter, variant.version, alias, variant.key)


def not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model}' does not exist", param="model")


class NameResolver:
    """`model` (+ tenant, + A/B user) -> Target; registers adapters-directory folders on
    first use and keeps them following their folder."""

    def __init__(
        self,
        base_name: str,
        registry: Registry,
        catalog: DirectoryCatalog | None,
        replaced: Callable[[], Awaitable[object]],
    ) -> None:
        """`replaced`: called after a folder's new weights became the current version
        (the version it replaces may sit idle in the engine: lora_pool releases it)."""
        self.base_name = base_name
        self.registry = registry
        self.catalog = catalog
        self._replaced = replaced
        self._locks: dict[str, asyncio.Lock] = {}

    def split(self, model: str) -> str | None:
        """The adapter/alias part of `model` (None for the base); raises ModelNotFound."""
        return parse_model(model, self.base_name)

    async def resolve(
        self, model: str, user: str | None = None, tenant: str | None = None
    ) -> Target:
        """What serves `model` for `tenant` (None: the operator, or open mode). Nothing is
        downloaded or loaded here: that waits for admission (see LoraPool.acquire).

        A tenant asking for another tenant's private adapter or alias gets exactly the
        404 of a name that does not exist: no existence leak.
        """
        name = self.split(model)
        if name is None:
            return Target(model=self.base_name)
        alias = self.registry.alias(name)
        if alias is not None and not usable_by(alias, tenant):
            raise not_found(model)
        picked = pick(self.registry, name, user)
        version = await self._version(picked.adapter, picked.number, model, tenant)
        if picked.alias is None:
            return Target(model=f"{self.base_name}:{name}", version=version)
        return Target(
            model=f"{self.base_name}:{picked.alias.name}",
            version=version,
            alias=picked.alias.name,
            variant=picked.variant,
        )

    async def version_of(self, name: str, number: int | None, tenant: str | None) -> Target:
        """Adapter `name` (version `number`, None: the current one) as `tenant` may use
        it, as a target of its own (an alias's shadow); raises ModelNotFound."""
        model = f"{self.base_name}:{name}"
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
            if self.catalog is not None:
                with contextlib.suppress(AdapterError):
                    await asyncio.to_thread(self.catalog.get, name)
            raise not_found(model)
        if record is None or self._discovered(record):
            record = await self._discover(name, model, record)
        version = record.current if number is None else record.version(number)
        if version is None:
            raise not_found(model)
        return version

    def _discovered(self, record: AdapterRecord) -> bool:
        """Whether `record` follows a folder of the adapters directory: only if registered
        by discovery (a flag stored with it), never when an admin registered it from a
        folder that happens to be there (review M9; registered before the flag: unknown)."""
        if self.catalog is None or record.discovered is False:
            return False
        # Discovered (or unknown): it follows the folder while its current version is
        # from there; an admin swap to a version from elsewhere takes it over, a rollback
        # hands it back.
        current = record.current
        return current is not None and Path(current.source).parent == self.catalog.root

    async def _discover(self, name: str, model: str, record: AdapterRecord | None) -> AdapterRecord:
        """Adapters-directory folders are registered on first use, and follow their folder:
        new weights there become a new current version (the folder is their control
        plane). Validation comes first; the catalog caches it until the files change.
        """
        if self.catalog is None:
            raise not_found(model)
        try:
            spec = await asyncio.to_thread(self.catalog.get, name)
        except (AdapterNotFound, InvalidAdapterName, PathOutsideRoots):
            # A name that cannot exist is simply not found: nothing about the filesystem
            # behind it reaches the client.
            raise not_found(model) from None
        except AdapterError as exc:
            exc.param = "model"
            raise
        if (
            record is not None
            and record.current is not None
            and record.current.content_digest == spec.content_digest
        ):
            return record
        async with self._locks.setdefault(name, asyncio.Lock()):
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
                # it to release it, so look now, as admin swaps do.
                await self._replaced()
            record = self.registry.adapter(name)
        if record is None:
            raise not_found(model)
        return record
