"""Aliases (a name over weighted adapter versions, for A/B tests and pins): the
registry's snapshot of them, and which versions they pin."""

from __future__ import annotations

import threading
from collections.abc import Callable

from adapters_registry.errors import InvalidAlias, TenantNotFound
from adapters_registry.names import check_name
from adapters_registry.records import AdapterRecord, AliasRecord, Variant
from adapters_registry.store import Store
from adapters_registry.tenants import Tenants, usable_by


class Aliases:
    """Aliases, read from an in-memory snapshot; writes go to the database first (under
    the registry's lock, shared with the other parts of the snapshot)."""

    def __init__(
        self,
        store: Store,
        lock: threading.Lock,
        adapter: Callable[[str], AdapterRecord | None],
        tenants: Tenants,
    ) -> None:
        self._store = store
        self._lock = lock
        self._adapter = adapter
        self._tenants = tenants
        self._aliases: dict[str, AliasRecord] = {}
        # (adapter, version) pinned by some alias: kept up to date on alias writes, so that
        # "can a new request still reach this version?" costs O(1), not O(registry).
        self._pins: frozenset[tuple[str, int]] = frozenset()
        # Bumped on every change (see Registry.generation).
        self.generation = 0

    def reload(self) -> None:
        """Read the snapshot again (the caller holds the lock, or nothing else runs)."""
        self._aliases = {a.name: a for a in self._store.list_aliases()}
        self._changed()

    def alias(self, name: str) -> AliasRecord | None:
        return self._aliases.get(name)

    def aliases(self) -> list[AliasRecord]:
        return sorted(self._aliases.values(), key=lambda a: a.name)

    def __contains__(self, name: str) -> bool:
        return name in self._aliases

    def pins(self, name: str, version: int) -> bool:
        """Whether some alias pins version `version` of adapter `name`, in O(1)."""
        return (name, version) in self._pins

    def pinned_versions(self) -> set[tuple[str, int]]:
        return set(self._pins)

    def put_alias(
        self,
        name: str,
        variants: tuple[Variant, ...],
        *,
        owner: str | None = None,
        shared: bool = False,
    ) -> AliasRecord:
        check_name(name)
        if owner is not None and self._tenants.tenant(owner) is None:
            raise TenantNotFound(f"tenant {owner!r} not found", adapter=name)
        for v in variants:
            target = self._adapter(v.adapter)
            # An alias must not become a way into an adapter its users could not name:
            # a shared alias needs shared variants, a tenant's alias ones it may use.
            reachable = target is None or (target.shared if shared else usable_by(target, owner))
            if not reachable:
                audience = "every tenant" if shared else f"tenant {owner!r}"
                raise InvalidAlias(
                    f"alias {name!r}: adapter {v.adapter!r} is not usable by {audience}",
                    adapter=name,
                )
        with self._lock:
            record = self._store.put_alias(name, variants, owner=owner, shared=shared)
            self._aliases[name] = record
            self._changed()
        return record

    def delete_alias(self, name: str) -> AliasRecord:
        with self._lock:
            record = self._store.delete_alias(name)
            self._aliases.pop(name, None)
            self._changed()
        return record

    def _changed(self) -> None:
        self._pins = frozenset(
            (v.adapter, v.version)
            for alias in self._aliases.values()
            for v in alias.variants
            if v.version is not None
        )
        self.generation += 1
