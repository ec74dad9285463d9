"""Model name -> what serves it: the base alone, or one adapter version loaded in the engine.

Accepted names: `<base>` (no adapter), `<base>:<adapter>` (as SGLang and Ray Serve LLM
spell it) and a bare `<adapter>` (as vLLM and the Kubernetes inference gateway send it).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from adapters_registry import (
    AdapterNotFound,
    AdapterSpec,
    DirectoryCatalog,
    InvalidAdapterName,
    PathOutsideRoots,
)
from server.engine.base import Engine, LoraHandle
from server.errors import ModelNotFound


@dataclass(frozen=True)
class Target:
    model: str  # the canonical name: `<base>` or `<base>:<adapter>`
    adapter: AdapterSpec | None
    lora: LoraHandle | None


class AdapterRouter:
    def __init__(self, base_name: str, catalog: DirectoryCatalog | None, engine: Engine) -> None:
        self._base = base_name
        self._catalog = catalog
        self._engine = engine
        # vLLM caches adapters by integer id: one id per distinct weights (sha256), never
        # reused, so a changed adapter can never be served from a stale cache entry.
        self._ids = itertools.count(1)
        self._loaded: dict[str, LoraHandle] = {}  # sha256 -> handle
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def base_name(self) -> str:
        return self._base

    def adapter_names(self) -> list[str]:
        return self._catalog.names() if self._catalog is not None else []

    def loaded(self) -> list[LoraHandle]:
        return list(self._loaded.values())

    def split(self, model: str) -> str | None:
        """The adapter part of `model` (None for the base); raises ModelNotFound."""
        if model == self._base:
            return None
        base, sep, adapter = model.partition(":")
        if sep:
            if base != self._base or not adapter:
                raise _not_found(model)
            return adapter
        return model

    async def resolve(self, model: str) -> Target:
        adapter_name = self.split(model)
        if adapter_name is None:
            return Target(model=self._base, adapter=None, lora=None)
        if self._catalog is None:
            raise _not_found(model)
        try:
            # Validation reads files and hashes weights: keep it off the event loop.
            spec = await asyncio.to_thread(self._catalog.get, adapter_name)
        except (AdapterNotFound, InvalidAdapterName, PathOutsideRoots):
            # A name that cannot exist is simply not found: the client learns nothing of
            # the filesystem behind it.
            raise _not_found(model) from None
        lora = await self._ensure_loaded(spec)
        return Target(model=f"{self._base}:{spec.name}", adapter=spec, lora=lora)

    async def _ensure_loaded(self, spec: AdapterSpec) -> LoraHandle:
        handle = self._loaded.get(spec.sha256)
        if handle is not None:
            return handle
        # One lock per adapter name: concurrent first requests load it once.
        lock = self._locks.setdefault(spec.name, asyncio.Lock())
        async with lock:
            handle = self._loaded.get(spec.sha256)
            if handle is None:
                handle = LoraHandle(name=spec.name, lora_id=next(self._ids), path=str(spec.path))
                await self._engine.add_lora(handle)
                self._loaded[spec.sha256] = handle
        return handle


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model}' does not exist", param="model")
