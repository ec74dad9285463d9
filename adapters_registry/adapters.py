"""Adapters and their versions: the registry's snapshot of them, and its writes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters_registry.records import AdapterRecord, ServingDefaults, VersionRecord
from adapters_registry.spec import AdapterSpec
from adapters_registry.store import Store


@dataclass(frozen=True)
class Placement:
    """How a validated version enters the registry."""

    create: bool
    make_current: bool
    owner: str | None
    shared: bool
    discovered: bool = False
    defaults: ServingDefaults | None = None


class Adapters:
    """Adapters and their versions, read from an in-memory snapshot; writes go to the
    database first (under the registry's lock, shared with the other parts of the
    snapshot). Their files are registry.py's and files.py's business."""

    def __init__(self, store: Store, lock: threading.Lock) -> None:
        self._store = store
        self._lock = lock
        self.snapshot: dict[str, AdapterRecord] = {}
        # Bumped on every change (see Registry.generation).
        self.generation = 0

    def reload(self) -> None:
        """Read the snapshot again (the caller holds the lock, or nothing else runs)."""
        self.snapshot = {a.name: a for a in self._store.list_adapters()}

    def adapter(self, name: str) -> AdapterRecord | None:
        return self.snapshot.get(name)

    def adapters(self) -> list[AdapterRecord]:
        return sorted(self.snapshot.values(), key=lambda a: a.name)

    def __contains__(self, name: str) -> bool:
        return name in self.snapshot

    def current_versions(self) -> set[tuple[str, int]]:
        return {
            (a.name, a.current_version)
            for a in self.snapshot.values()
            if a.current_version is not None
        }

    def content_referenced(self, digest: str) -> bool:
        """Whether some version records that content (weights and config)."""
        return any(v.content_digest == digest for a in self.snapshot.values() for v in a.versions)

    def folder_names(self) -> set[str]:
        """The names of the folders every version's files are in."""
        return {Path(v.path).name for a in self.snapshot.values() for v in a.versions}

    # -- writes ------------------------------------------------------------------------

    def record(
        self, spec: AdapterSpec, *, source: str, path: Path, how: Placement
    ) -> VersionRecord:
        """Record a validated version whose files are at `path`."""
        with self._lock:
            record = self._store.add_version(
                spec,
                source=source,
                path=str(path),
                create=how.create,
                make_current=how.make_current,
                owner=how.owner,
                shared=how.shared,
                discovered=how.discovered,
                defaults=how.defaults,
            )
            self._refresh(spec.name)
        return record

    def set_current(self, name: str, version: int) -> AdapterRecord:
        return self._write(name, lambda: self._store.set_current(name, version))

    def set_pinned(self, name: str, pinned: bool) -> AdapterRecord:
        return self._write(name, lambda: self._store.set_pinned(name, pinned))

    def set_access(self, name: str, *, owner: str | None, shared: bool) -> AdapterRecord:
        return self._write(name, lambda: self._store.set_access(name, owner=owner, shared=shared))

    def delete_version(self, name: str, version: int) -> VersionRecord:
        with self._lock:
            record = self._store.delete_version(name, version)
            self._refresh(name)
        return record

    def delete_adapter(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._store.delete_adapter(name)
            self.snapshot.pop(name, None)
            self.generation += 1
        return record

    def _write(self, name: str, op: Callable[[], AdapterRecord]) -> AdapterRecord:
        with self._lock:
            record = op()
            self.snapshot[name] = record
            self.generation += 1
        return record

    def _refresh(self, name: str) -> None:
        self.snapshot[name] = self._store.get(name)
        self.generation += 1
