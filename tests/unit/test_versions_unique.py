"""Issue 14 / review H3: `name@N` names one content forever, also across a delete of the
whole adapter, on both databases, and in databases created by older versions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters_registry.database import open_database
from adapters_registry.schema import MIGRATIONS as _MIGRATIONS
from adapters_registry.schema import SCHEMA as _SCHEMA
from adapters_registry.spec import AdapterSpec
from adapters_registry.store import Store


def spec(name: str, n: int) -> AdapterSpec:
    return AdapterSpec(
        name=name,
        path=Path("/nowhere"),
        base_model="tiny",
        rank=8,
        alpha=16.0,
        target_modules=("q_proj",),
        sha256=f"{n:064x}",
        size_bytes=100 + n,
    )


@pytest.fixture
def stores(database: str | Path) -> Iterator[Callable[[], Store]]:
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(Store(database))
        return opened[-1]

    yield open_one
    for s in opened:
        s.close()


def add(store: Store, name: str, n: int, *, create: bool = False) -> int:
    return store.add_version(
        spec(name, n), source="upload", path=f"/p/{n}", create=create, make_current=True
    ).version


def test_a_recreated_adapter_continues_the_numbering(stores: Callable[[], Store]) -> None:
    store = stores()
    assert add(store, "pirate", 1, create=True) == 1
    assert add(store, "pirate", 2) == 2
    store.delete_adapter("pirate")
    # The same name, other weights: a new number, never pirate@1 or pirate@2 again.
    assert add(store, "pirate", 3, create=True) == 3
    assert store.get("pirate").version(3) is not None
    assert store.get("pirate").version(1) is None
    # Another replica (another process on the same database) continues it too.
    other = stores()
    other.delete_adapter("pirate")
    assert add(other, "pirate", 4, create=True) == 4
    # Deleting the newest version, then adding one, does not reuse its number either.
    assert add(other, "pirate", 5) == 5
    other.set_current("pirate", 4)
    other.delete_version("pirate", 5)
    assert add(store, "pirate", 6) == 6


def test_numbering_survives_the_upgrade_of_an_old_database(database: str | Path) -> None:
    """A database at schema 2 (before the tombstones): its adapters keep their next
    number once upgraded, and a delete + re-create after the upgrade continues it."""
    old = open_database(database)
    with old.write() as db:
        for statement in _SCHEMA:
            db.execute(statement)
        for statement in _MIGRATIONS[2]:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        db.execute(
            "INSERT INTO adapters (name, current_version, next_version, created_at) "
            "VALUES ('legacy', 7, 8, 1.5)"
        )
        db.execute(
            "INSERT INTO versions VALUES ('legacy', 7, ?, 10, 8, 16.0, '[\"q_proj\"]', "
            "'tiny', '/src', '/src', 1.5)",
            ("a" * 64,),
        )
    old.close()
    store = Store(database)
    legacy = store.get("legacy")
    assert legacy.current is not None and legacy.current.sha256 == "a" * 64
    store.delete_adapter("legacy")
    assert add(store, "legacy", 9, create=True) == 8
    store.close()
