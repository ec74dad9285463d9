"""Issue 14 items 2 and 3 (review H3, M4 content half, M9, L5): a version pins its
weights *and* its config, residency and every engine-facing name carry that content's
digest, discovery never hijacks an admin's adapter, and deletes spare running requests."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_registry import SourceChanged
from adapters_registry.database import open_database
from adapters_registry.digest import config_digest, content_digest
from adapters_registry.registry import Registry
from server.adapters import AdapterRouter
from tests.adapters import make_adapter
from tests.fakes import FakeEngine, lease_endings
from tests.unit.test_registry import open_registry

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def registry(tmp_path: Path, database: str | Path) -> Iterator[Registry]:
    (tmp_path / "allowed").mkdir()
    reg = open_registry(tmp_path, tmp_path / "allowed", database)
    yield reg
    reg.close()


def upload(reg: Registry, name: str, folder: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    files = {n: io.BytesIO((folder / n).read_bytes()) for n in (CONFIG, WEIGHTS)}
    return reg.register_upload(name, files, **kwargs)  # type: ignore[arg-type]


def set_config(folder: Path, **fields: object) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(fields)
    (folder / CONFIG).write_text(json.dumps(config))


# -- H3: residency carries the content ---------------------------------------------------


async def test_a_recreated_adapter_never_gets_the_old_weights(
    registry: Registry, tmp_path: Path
) -> None:
    """Review H3, single process: delete an adapter while a request holds its version,
    register the name again with other weights: new requests run the new weights."""
    router = AdapterRouter("tiny", registry, None, FakeEngine())
    old = upload(registry, "pirate", make_adapter(tmp_path / "old", seed=1))
    target = await router.resolve("tiny:pirate")
    async with router.lease(target) as held:
        registry.delete_adapter("pirate")
        new = upload(registry, "pirate", make_adapter(tmp_path / "new", seed=2))
        fresh_target = await router.resolve("tiny:pirate")
        assert fresh_target.version == new
        async with router.lease(fresh_target) as fresh:
            assert fresh is not None and held is not None
            assert fresh.lora_id != held.lora_id
            assert fresh.digest == new.content_digest != old.content_digest
            assert (fresh.name, held.name) != ("pirate@1", "pirate@1")


async def test_residency_is_keyed_by_content_not_by_name_and_number(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if `pirate@1` came to name other content (a registry restored from a backup,
    another replica's stale snapshot), the engine's copy of the first is not reused."""
    router = AdapterRouter("tiny", registry, None, FakeEngine())
    upload(registry, "pirate", make_adapter(tmp_path / "a", seed=1))
    async with router.lease(await router.resolve("tiny:pirate")) as first:
        pass  # loaded, and idle
    other = upload(registry, "other", make_adapter(tmp_path / "b", seed=2))
    record = registry.adapter("pirate")
    assert record is not None and record.current is not None
    # pirate@1 now, in the snapshot, is other's content under pirate's name and number.
    impostor = dataclasses.replace(
        other, adapter="pirate", version=1, path=other.path, source="upload"
    )
    monkeypatch.setitem(
        registry._adapters, "pirate", dataclasses.replace(record, versions=(impostor,))
    )
    async with router.lease(await router.resolve("tiny:pirate")) as second:
        pass
    assert first is not None and second is not None
    assert second.lora_id != first.lora_id
    assert second.digest == other.content_digest
    # The name vLLM sees (its prefix cache keys on it) differs as well.
    assert second.engine_name != first.engine_name
    assert other.content_digest[:16] in second.engine_name


# -- M4: the config is pinned ------------------------------------------------------------


def test_config_digest_is_canonical() -> None:
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q", "v"]}
    same = [
        {**base, "lora_alpha": 16.0},
        {**base, "target_modules": ["v", "q"]},
        {**base, "use_rslora": False, "lora_dropout": 0.1, "task_type": "CAUSAL_LM"},
        {**base, "rank_pattern": {}, "base_model_name_or_path": "elsewhere"},
    ]
    for config in same:
        assert config_digest(config) == config_digest(base), config
    different = [
        {**base, "lora_alpha": 32},
        {**base, "use_rslora": True},
        {**base, "r": 16},
        {**base, "target_modules": ["q"]},
        {**base, "rank_pattern": {"q": 4}},
        {**base, "layers_to_transform": [0]},
    ]
    digests = {config_digest(c) for c in different}
    assert len(digests) == len(different) and config_digest(base) not in digests
    assert content_digest("a" * 64, None) == "a" * 64  # versions registered before
    assert content_digest("a" * 64, "b" * 64) != content_digest("a" * 64, "c" * 64)


def test_a_config_changed_after_registration_is_refused(registry: Registry, tmp_path: Path) -> None:
    """Same weights, other lora_alpha in place: never the old name serving another scale.
    A local source is copied at registration, so a change in the source folder is not
    served; a change in the stored copy is 409 source_changed."""
    folder = make_adapter(tmp_path / "allowed" / "pirate")
    v = registry.register("pirate", str(folder))
    registry.local_files(v)  # as registered: fine
    set_config(folder, lora_alpha=64)
    assert json.loads((registry.local_files(v) / CONFIG).read_text())["lora_alpha"] == 16
    stored = Path(v.path)
    set_config(stored, lora_alpha=64)
    registry._verified.clear()  # as on its first use after a start
    with pytest.raises(SourceChanged, match="changed"):
        registry.local_files(v)
    set_config(stored, lora_alpha=16)  # back as it was: served again
    registry.local_files(v)


def test_same_weights_with_another_config_are_another_content(
    registry: Registry, tmp_path: Path
) -> None:
    """Uploads were stored by the weights' sha256 alone: the second upload silently
    served the first one's config."""
    folder = make_adapter(tmp_path / "a")
    first = upload(registry, "pirate", folder)
    set_config(folder, lora_alpha=64)
    second = upload(registry, "formal", folder)
    assert first.sha256 == second.sha256
    served = json.loads((registry.local_files(second) / CONFIG).read_text())
    assert served["lora_alpha"] == 64
    assert json.loads((registry.local_files(first) / CONFIG).read_text())["lora_alpha"] == 16
    assert first.content_digest != second.content_digest


# -- L5: deletes wait for running requests -----------------------------------------------


async def test_delete_keeps_files_until_the_last_request_ends(
    registry: Registry, tmp_path: Path
) -> None:
    router = AdapterRouter("tiny", registry, None, FakeEngine())
    v = upload(registry, "pirate", make_adapter(tmp_path / "a"))
    files = registry.local_files(v)
    async with router.lease(await router.resolve("tiny:pirate")):
        registry.delete_adapter("pirate")
        await router.release_unreachable()
        # The engine may re-read the folder while this request runs on it.
        assert (files / WEIGHTS).is_file()
    await lease_endings(router)
    assert not files.exists()
    assert registry.release_files() == []


def test_versions_registered_before_config_pinning_still_serve(
    tmp_path: Path, database: str | Path
) -> None:
    """A version from before the upgrade has no config digest: its files keep their old
    key (the weights' sha256) and it still loads, its weights still verified."""
    (tmp_path / "allowed").mkdir()
    reg = open_registry(tmp_path, tmp_path / "allowed", database)
    v = upload(reg, "old", make_adapter(tmp_path / "a"))
    reg.close()
    db = open_database(database)
    with db.write() as conn:
        conn.execute("UPDATE versions SET config_sha256 = NULL")
    db.close()
    reg = open_registry(tmp_path, tmp_path / "allowed", database)
    try:
        legacy = reg.adapter("old").current  # type: ignore[union-attr]
        assert legacy is not None and legacy.config_sha256 is None
        assert legacy.content_digest == legacy.sha256 == v.sha256
        assert (reg.local_files(legacy) / WEIGHTS).is_file()
    finally:
        reg.close()


async def test_another_replica_drops_the_old_content_of_a_recreated_name(
    tmp_path: Path, database: str | Path
) -> None:
    """Review H3, multi-replica: replica B holds pirate@1 idle; on replica A pirate is
    deleted and registered again with other weights. After B's refresh, B must not keep
    serving the old weights to requests for pirate."""
    roots = tmp_path / "allowed"
    roots.mkdir()
    a = open_registry(tmp_path, roots, database)
    b = open_registry(tmp_path, roots, database)
    try:
        a.register("pirate", str(make_adapter(roots / "old", seed=1)))
        b.refresh()
        router_b = AdapterRouter("tiny", b, None, FakeEngine())
        async with router_b.lease(await router_b.resolve("tiny:pirate")) as old:
            pass  # B now holds the old content, idle
        a.delete_adapter("pirate")
        new = a.register("pirate", str(make_adapter(roots / "new", seed=2)))
        assert b.refresh()
        await router_b.release_unreachable()  # what the server does after a refresh
        assert old is not None and all(h.lora_id != old.lora_id for h, _ in router_b.loaded())
        target = await router_b.resolve("tiny:pirate")
        assert target.version == new
        async with router_b.lease(target) as fresh:
            assert fresh is not None and fresh.lora_id != old.lora_id
    finally:
        a.close()
        b.close()
