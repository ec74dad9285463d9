"""Tenants and their API keys: the registry's snapshot of who may call, and the rule of
who may use what (`usable_by`)."""

from __future__ import annotations

import threading

from adapters_registry import keys
from adapters_registry.names import check_name
from adapters_registry.records import AdapterRecord, AliasRecord, KeyRecord, TenantRecord
from adapters_registry.store import Store


def usable_by(record: AdapterRecord | AliasRecord, tenant: str | None) -> bool:
    """Whether `tenant` may use an adapter or alias; None is the operator (or open mode)."""
    return tenant is None or record.shared or record.owner == tenant


class Tenants:
    """Tenants and keys, read from an in-memory snapshot; writes go to the database
    first (under the registry's lock, shared with the other parts of the snapshot)."""

    def __init__(self, store: Store, lock: threading.Lock) -> None:
        self._store = store
        self._lock = lock
        self._tenants: dict[str, TenantRecord] = {}
        self._keys: dict[str, KeyRecord] = {}

    def reload(self) -> None:
        """Read the snapshot again (the caller holds the lock, or nothing else runs)."""
        self._tenants = {t.name: t for t in self._store.tenants()}
        self._keys = {k.key_id: k for k in self._store.list_keys()}

    def tenant(self, name: str) -> TenantRecord | None:
        return self._tenants.get(name)

    def tenants(self) -> list[TenantRecord]:
        return sorted(self._tenants.values(), key=lambda t: t.name)

    def put_tenant(
        self, name: str, *, max_concurrent: int | None, tokens_per_minute: int | None
    ) -> TenantRecord:
        check_name(name)
        with self._lock:
            record = self._store.put_tenant(
                name, max_concurrent=max_concurrent, tokens_per_minute=tokens_per_minute
            )
            self._tenants[name] = record
        return record

    def delete_tenant(self, name: str) -> TenantRecord:
        with self._lock:
            record = self._store.delete_tenant(name)
            self._tenants.pop(name, None)
            self._keys = {k: v for k, v in self._keys.items() if v.tenant != name}
        return record

    def create_key(self, tenant: str) -> tuple[KeyRecord, str]:
        """A new key for `tenant`: (its record, the full key, to be shown once)."""
        key_id, full, digest = keys.new_key()
        with self._lock:
            record = self._store.add_key(tenant, key_id, digest)
            self._keys[key_id] = record
            self._tenants[tenant] = self._store.tenant(tenant)
        return record, full

    def delete_key(self, tenant: str, key_id: str) -> None:
        with self._lock:
            self._store.delete_key(tenant, key_id)
            self._keys.pop(key_id, None)
            self._tenants[tenant] = self._store.tenant(tenant)

    def has_tenants(self) -> bool:
        """Open mode ends with the first tenant, not its first key: revoking every key
        must not reopen the server to anyone."""
        return bool(self._tenants)

    def authenticate(self, key: str) -> TenantRecord | None:
        """The tenant a key belongs to, or None (malformed, unknown or wrong secret)."""
        parsed = keys.parse(key)
        if parsed is None:
            return None
        record = self._keys.get(parsed[0])
        if record is None or not keys.matches(parsed[1], record.secret_sha256):
            return None
        return self._tenants.get(record.tenant)
