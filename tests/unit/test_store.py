"""The Store on each backend (conftest.py): schema migrations, errors, and several
replicas sharing one database (several Store instances, as several server processes
would open on one PostgreSQL database, or on one SQLite file on one host)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters_registry import AdapterNotFound, AlreadyExists, InUse
from adapters_registry.database import open_database, redact
from adapters_registry.errors import AdapterError
from adapters_registry.records import ServingDefaults, Variant
from adapters_registry.schema import MIGRATIONS as _MIGRATIONS
from adapters_registry.schema import SCHEMA as _SCHEMA
from adapters_registry.schema import SCHEMA_VERSION
from adapters_registry.spec import AdapterSpec
from adapters_registry.store import Store
from tests.databases import PostgresServer


def spec(name: str, n: int = 0) -> AdapterSpec:
    return AdapterSpec(
        name=name,
        path=Path("/nowhere"),
        base_model="tiny",
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        sha256=f"{n:064x}",
        size_bytes=3 * 2**31 + n,  # beyond 32 bits: PostgreSQL's INTEGER would overflow
    )


@pytest.fixture
def stores(database: str | Path) -> Iterator[Callable[[], Store]]:
    """Opens Store instances on the test's database (each one a 'replica')."""
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(Store(database))
        return opened[-1]

    yield open_one
    for s in opened:
        s.close()


def add(store: Store, name: str, n: int = 0, *, create: bool = False) -> int:
    return store.add_version(
        spec(name, n), source=f"/src/{n}", path=f"/src/{n}", create=create, make_current=True
    ).version


def test_round_trip_keeps_values_exact(stores: Callable[[], Store]) -> None:
    store = stores()
    store.put_tenant("t", max_concurrent=2**40, tokens_per_minute=2**62)
    store.add_version(
        spec("a", 1),
        source="/src",
        path="/src",
        create=True,
        make_current=True,
        owner="t",
        shared=True,
    )
    # Weights are ints in the API; the store keeps any number it is given.
    store.put_alias("al", (Variant("a", 1, 0.25), Variant("a", None, 0.75)), owner="t")  # type: ignore[arg-type]
    record = store.get("a")
    v = record.versions[0]
    assert (v.size_bytes, v.alpha, v.target_modules) == (3 * 2**31 + 1, 16.0, ("q_proj", "v_proj"))
    assert (record.owner, record.shared, record.current_version) == ("t", True, 1)
    # timestamps are doubles on both (a 32-bit REAL would round them by minutes)
    assert abs(record.created_at - v.created_at) < 1.0
    assert record.created_at != round(record.created_at, -2)
    tenant = store.tenant("t")
    assert (tenant.max_concurrent, tenant.tokens_per_minute) == (2**40, 2**62)
    alias = store.get_alias("al")
    assert alias.variants == (Variant("a", 1, 0.25), Variant("a", None, 0.75))  # type: ignore[arg-type]
    updated = store.put_alias("al", (Variant("a", 1, 1.0),), shared=True)  # type: ignore[arg-type]
    assert updated.created_at == alias.created_at and updated.updated_at >= alias.updated_at
    assert store.get_alias("al") == updated


def test_lists_are_sorted_by_name(stores: Callable[[], Store]) -> None:
    store = stores()
    names = ["b", "a-2", "A", "a", "a_1", "Z", "z"]
    for i, name in enumerate(names):
        add(store, name, i, create=True)
        store.put_tenant(f"t{name}", max_concurrent=None, tokens_per_minute=None)
        store.put_alias(f"x{name}", (Variant(name, None, 1),))
    assert [a.name for a in store.list_adapters()] == sorted(names)
    assert [a.name for a in store.list_aliases()] == sorted(f"x{n}" for n in names)
    assert [t.name for t in store.tenants()] == sorted(f"t{n}" for n in names)


def test_constraint_violations_are_registry_errors(stores: Callable[[], Store]) -> None:
    store = stores()
    store.put_tenant("t", max_concurrent=None, tokens_per_minute=None)
    store.add_key("t", "k1", "0" * 64)
    with pytest.raises(AlreadyExists):  # a driver's IntegrityError, mapped
        store.add_key("t", "k1", "1" * 64)
    # the failed transaction left nothing behind and the store still works
    assert store.tenant("t").key_ids == ("k1",)
    store.add_key("t", "k2", "1" * 64)
    assert store.tenant("t").key_ids == ("k1", "k2")


def test_failed_write_rolls_back(stores: Callable[[], Store]) -> None:
    store = stores()
    add(store, "a", 1, create=True)
    add(store, "a", 2)
    store.put_alias("al", (Variant("a", 2, 1),))
    with pytest.raises(InUse):
        store.delete_adapter("a")
    with pytest.raises(AdapterNotFound):
        store.set_current("a", 7)
    assert [v.version for v in store.get("a").versions] == [1, 2]


def test_migrates_a_version_1_database(database: str | Path) -> None:
    old = open_database(database)
    with old.write() as db:
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute("INSERT INTO adapters (name, created_at) VALUES ('legacy', 1.5)")
        db.execute("INSERT INTO aliases VALUES ('old', '[]', 1.5, 2.5)")
    old.close()
    assert max(_MIGRATIONS) == SCHEMA_VERSION

    for _ in range(2):  # the second open finds it current and changes nothing
        store = Store(database)
        record = store.get("legacy")
        assert (record.owner, record.shared, record.created_at) == (None, False, 1.5)
        assert store.get_alias("old").owner is None
        with store.database.read() as db:
            (version,) = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert int(version) == SCHEMA_VERSION
        store.close()


def test_migrates_a_version_4_database_keeping_its_versions(database: str | Path) -> None:
    """Serving defaults (schema 5) come to a database in use: every version kept as it
    was, with no defaults; new versions carry theirs."""
    old = open_database(database)
    with old.write() as db:
        for statement in _SCHEMA:
            db.execute(statement)
        for version in range(2, 5):
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('schema_version', '4')")
        db.execute(
            "INSERT INTO adapters (name, current_version, next_version, created_at, owner, "
            "shared, discovered) VALUES ('legacy', 2, 3, 1.5, NULL, 1, 0)"
        )
        for n in (1, 2):
            db.execute(
                "INSERT INTO versions (adapter, version, sha256, size_bytes, rank, alpha, "
                "target_modules, base_model, source, path, created_at, config_sha256) "
                "VALUES ('legacy', ?, ?, 10, 8, 16.0, '[\"q_proj\"]', 'tiny', '/s', '/p', 2.5, "
                "'c')",
                (n, f"{n:064x}"),
            )
        db.execute("INSERT INTO version_numbers VALUES ('legacy', 3)")
    old.close()

    store = Store(database)
    try:
        record = store.get("legacy")
        assert (record.current_version, record.shared) == (2, True)
        assert [(v.version, v.sha256, v.config_sha256, v.defaults) for v in record.versions] == [
            (1, f"{1:064x}", "c", None),
            (2, f"{2:064x}", "c", None),
        ]
        defaults = ServingDefaults(system_prompt="Arr.", temperature=0.0, stop=("x", "y"))
        added = store.add_version(
            spec("legacy", 3),
            source="/s",
            path="/p",
            create=False,
            make_current=False,
            defaults=defaults,
        )
        assert (added.version, added.defaults) == (3, defaults)
        assert store.get("legacy").version(3) == added
    finally:
        store.close()


def test_replicas_see_each_others_writes(stores: Callable[[], Store]) -> None:
    one, two = stores(), stores()
    add(one, "pirate", 1, create=True)
    assert two.get("pirate").current_version == 1
    assert add(two, "pirate", 2) == 2
    one.set_pinned("pirate", True)
    assert (two.get("pirate").pinned, one.get("pirate").current_version) == (True, 2)
    two.put_alias("bot", (Variant("pirate", 1, 1),))
    assert [a.name for a in one.list_aliases()] == ["bot"]
    with pytest.raises(AlreadyExists):  # the name check sees the other replica's alias
        add(one, "bot", 3, create=True)
    with pytest.raises(InUse):  # and its routes
        one.delete_version("pirate", 1)
    one.put_tenant("t", max_concurrent=1, tokens_per_minute=None)
    two.add_key("t", "k", "0" * 64)
    assert [k.key_id for k in one.list_keys()] == ["k"]


def test_concurrent_add_version_numbers_are_distinct(stores: Callable[[], Store]) -> None:
    replicas = [stores() for _ in range(4)]
    add(replicas[0], "pirate", 0, create=True)
    per_replica = 8
    numbers: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(replicas))

    def writer(i: int, store: Store) -> None:
        try:
            start.wait()
            for j in range(per_replica):
                numbers.append(add(store, "pirate", 1 + i * per_replica + j))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, s)) for i, s in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    expected = list(range(2, 2 + len(replicas) * per_replica))
    assert sorted(numbers) == expected  # no number given twice, none skipped
    record = replicas[1].get("pirate")
    assert [v.version for v in record.versions] == [1, *expected]
    assert len({v.sha256 for v in record.versions}) == len(record.versions)


def test_concurrent_creates_of_one_name_have_one_winner(stores: Callable[[], Store]) -> None:
    replicas = [stores() for _ in range(4)]
    outcomes: list[object] = []
    start = threading.Barrier(len(replicas))

    def create(i: int, store: Store) -> None:
        start.wait()
        try:
            if i % 2:
                outcomes.append(add(store, "name", i, create=True))
            else:
                outcomes.append(store.put_alias("name", (Variant("base", 1, 1),)))
        except AdapterError as exc:
            outcomes.append(exc)

    add(replicas[0], "base", 99, create=True)
    threads = [threading.Thread(target=create, args=(i, s)) for i, s in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == len(replicas)
    failures = [o for o in outcomes if isinstance(o, AlreadyExists)]
    won_adapter = any(isinstance(o, int) for o in outcomes)
    if won_adapter:  # one adapter, and every other attempt refused
        assert len(failures) == len(replicas) - 1
        with pytest.raises(AdapterNotFound):
            replicas[0].get_alias("name")
    else:  # aliases may be replaced, but never alongside an adapter of that name
        assert len(failures) == len(replicas) // 2
        with pytest.raises(AdapterNotFound):
            replicas[0].get("name")


def test_open_database_urls(tmp_path: Path) -> None:
    for target in (f"sqlite://{tmp_path}/a.db", str(tmp_path / "b.db"), tmp_path / "c.db"):
        db = open_database(target)
        assert db.dialect == "sqlite"
        db.close()
    assert {p.name for p in tmp_path.iterdir()} >= {"a.db", "b.db", "c.db"}
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_database("mysql://u:pw@h/db")
    assert redact("postgresql://u:pw@h:5432/db?sslmode=require") == (
        "postgresql://u:***@h:5432/db?sslmode=require"
    )


def _drop_connections(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


def test_postgres_reconnects_after_the_server_drops_it(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    store = Store(url)
    add(store, "a", 1, create=True)
    _drop_connections(url)
    assert store.get("a").current_version == 1  # a read reconnects
    _drop_connections(url)
    assert add(store, "a", 2) == 2  # and so does a write
    store.close()


def test_settings_pick_the_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from server.settings import Settings

    assert Settings(home=tmp_path).registry_database == tmp_path / "registry.db"
    monkeypatch.setenv("LORASWAP_REGISTRY_DB", str(tmp_path / "old.db"))  # still honoured
    assert Settings().registry_database == tmp_path / "old.db"
    monkeypatch.setenv("LORASWAP_REGISTRY__DATABASE_URL", "postgresql://u@h/db")
    with pytest.raises(ValueError, match="not both"):
        Settings()
    monkeypatch.delenv("LORASWAP_REGISTRY_DB")
    assert Settings().registry_database == "postgresql://u@h/db"
