"""Request-path costs that must not grow with the registry (loadtests/scale.py found both):
releasing a version when a request ends, and the names /v1/models lists."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_registry.records import Variant
from adapters_registry.registry import Registry
from server.adapters import AdapterRouter
from tests.adapters import make_adapter
from tests.fakes import FakeEngine, lease_endings
from tests.unit.test_registry import open_registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    roots = tmp_path / "allowed"
    for i in range(3):
        make_adapter(roots / f"w{i}", seed=i)
    # request-path costs are backend independent: the embedded SQLite store
    reg = open_registry(tmp_path, roots, tmp_path / "registry.db")
    yield reg
    reg.close()


def _w(registry: Registry, i: int) -> str:
    return str(registry.config.allowed_roots[0] / f"w{i}")


def test_is_referenced_matches_referenced_versions(registry: Registry) -> None:
    registry.register("a", _w(registry, 0))
    registry.register("a", _w(registry, 1), create=False)
    registry.register("a", _w(registry, 2), create=False, make_current=False)
    registry.register("b", _w(registry, 0))

    def agree() -> None:
        referenced = registry.referenced_versions()
        for name, versions in (("a", (1, 2, 3, 4)), ("b", (1, 2)), ("zz", (1,))):
            for v in versions:
                assert registry.is_referenced(name, v) == ((name, v) in referenced), (name, v)

    agree()
    assert registry.is_referenced("a", 2) and not registry.is_referenced("a", 1)
    registry.put_alias("ab", (Variant("a", 1, 1), Variant("b", None, 1)))
    agree()
    assert registry.is_referenced("a", 1)
    registry.set_current("a", 3)
    agree()
    registry.delete_alias("ab")
    agree()
    assert not registry.is_referenced("a", 1)
    registry.delete_adapter("b")
    agree()
    assert not registry.is_referenced("b", 1)


def test_alias_pins_survive_a_reopen(tmp_path: Path, registry: Registry) -> None:
    registry.register("a", _w(registry, 0))
    registry.register("a", _w(registry, 1), create=False)
    registry.put_alias("old", (Variant("a", 1, 1),))
    registry.close()
    again = open_registry(tmp_path, registry.config.allowed_roots[0], tmp_path / "registry.db")
    try:
        assert again.is_referenced("a", 1) and again.is_referenced("a", 2)
    finally:
        again.close()


def test_generation_changes_on_every_adapter_or_alias_write(registry: Registry) -> None:
    seen = [registry.generation]

    def changed() -> None:
        assert registry.generation != seen[-1]
        seen.append(registry.generation)

    registry.register("a", _w(registry, 0))
    changed()
    registry.register("a", _w(registry, 1), create=False)
    changed()
    registry.set_current("a", 1)
    changed()
    registry.set_pinned("a", True)
    changed()
    registry.put_tenant("t", max_concurrent=None, tokens_per_minute=None)
    registry.set_access("a", owner="t", shared=False)
    changed()
    registry.put_alias("ab", (Variant("a", 1, 1),))
    changed()
    registry.delete_alias("ab")
    changed()
    registry.delete_version("a", 2)
    changed()
    registry.delete_adapter("a")
    changed()


def _swell(registry: Registry, n: int) -> None:
    """`n` more adapters in the in-memory snapshot (what requests read), without the
    database: the request path is what is under test."""
    template = registry.adapter("a")
    assert template is not None
    for i in range(n):
        registry._adapters[f"s{i:05d}"] = dataclasses.replace(template, name=f"s{i:05d}")


async def test_a_request_ending_never_scans_the_registry(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register("a", _w(registry, 0))
    _swell(registry, 1000)
    engine = FakeEngine()
    router = AdapterRouter("tiny", registry, None, engine)

    def scan() -> set[tuple[str, int]]:
        raise AssertionError("O(registry) scan on the request path")

    monkeypatch.setattr(registry, "referenced_versions", scan)
    target = await router.resolve("tiny:a")
    async with router.lease(target):
        pass
    assert [h.name for h, _ in router.loaded()] == ["a@1"]  # current: stays
    # A swap while a request runs on v1: v1 leaves the engine when that request ends.
    target = await router.resolve("tiny:a")
    async with router.lease(target) as handle:
        registry.register("a", _w(registry, 1), create=False)
        assert await router.release_unreachable() == []  # still running
    await lease_endings(router)
    assert handle is not None and engine.removed == [handle.lora_id]
    assert router.loaded() == []
    # The new version loads, and stays after its request.
    target = await router.resolve("tiny:a")
    async with router.lease(target):
        pass
    assert [h.name for h, _ in router.loaded()] == ["a@2"]


async def test_idle_versions_replaced_in_the_adapters_folder_are_released(
    tmp_path: Path,
) -> None:
    from adapters_registry import DirectoryCatalog

    folder = tmp_path / "served"
    make_adapter(folder / "f", seed=1)
    reg = open_registry(tmp_path, folder, tmp_path / "registry.db")
    try:
        catalog = DirectoryCatalog(folder, reg.base, reg.config.limits)
        engine = FakeEngine()
        router = AdapterRouter("tiny", reg, catalog, engine)
        async with router.lease(await router.resolve("tiny:f")):
            pass
        assert [h.name for h, _ in router.loaded()] == ["f@1"]
        make_adapter(folder / "f", seed=2)  # new weights in the folder: version 2
        async with router.lease(await router.resolve("tiny:f")):
            pass
        assert [h.name for h, _ in router.loaded()] == ["f@2"]
        assert len(engine.removed) == 1
    finally:
        reg.close()


async def test_model_names_are_cached_until_the_registry_changes(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register("a", _w(registry, 0))
    registry.put_tenant("t", max_concurrent=None, tokens_per_minute=None)
    registry.register("mine", _w(registry, 1), owner="t")
    _swell(registry, 100)
    router = AdapterRouter("tiny", registry, None, FakeEngine())
    calls: list[int] = []
    listing = registry.adapters

    def counted() -> list[Any]:
        calls.append(1)
        return listing()

    monkeypatch.setattr(registry, "adapters", counted)

    adapters, aliases = await router.model_names()
    assert len(adapters) == 102 and aliases == [] and "mine" in adapters
    assert await router.model_names() == (adapters, aliases)
    assert (await router.model_names("t"))[0] == ["mine"]  # only its own (nothing is shared)
    assert len(calls) == 2  # once per tenant
    registry.put_alias("ab", (Variant("a", 1, 1),))
    assert await router.model_names() == (adapters, ["ab"])
    registry.delete_adapter("mine")
    assert "mine" not in (await router.model_names())[0]
    assert await router.model_names("t") == ([], [])
    assert len(calls) == 5


def test_models_body_is_encoded_once_per_registry_generation_and_tenant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scale.md: /v1/models at 10,000 adapters built and encoded 10,000 dicts per call
    (1.1 MB, p50 28 ms). The encoded body is cached until the registry changes."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.engine.openai_layer import OpenAILayer
    from tests.unit.test_api import tiny_settings

    built: list[str] = []
    card = OpenAILayer.model_card

    def counted(layer: OpenAILayer, model_id: str, parent: str | None, kind: str | None) -> Any:
        built.append(model_id)
        return card(layer, model_id, parent, kind)

    monkeypatch.setattr(OpenAILayer, "model_card", counted)
    make_adapter(tmp_path / "adapters" / "folder", seed=3)
    with TestClient(create_app(tiny_settings(tmp_path), engine=FakeEngine())) as client:
        router: AdapterRouter = client.app.state.router  # type: ignore[attr-defined]
        for i in range(3):
            router.registry.register(
                f"a{i}", str(make_adapter(tmp_path / "adapters" / f"a{i}", seed=i))
            )
        first = client.get("/v1/models")
        assert first.status_code == 200 and first.headers["content-type"] == "application/json"
        ids = [m["id"] for m in first.json()["data"]]
        assert ids == ["tiny", "tiny:a0", "tiny:a1", "tiny:a2", "tiny:folder"]
        assert len(built) == 5
        for _ in range(3):
            assert client.get("/v1/models").content == first.content
        assert len(built) == 5  # served from the cache
        router.registry.put_alias("ab", (Variant("a0", 1, 1),))
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids[-1] == "tiny:ab" and len(built) == 11
        make_adapter(tmp_path / "adapters" / "other", seed=4)  # a new folder shows up too
        assert "tiny:other" in [m["id"] for m in client.get("/v1/models").json()["data"]]


async def test_models_body_cache_is_bounded(registry: Registry) -> None:
    registry.register("a", _w(registry, 0))
    router = AdapterRouter("tiny", registry, None, FakeEngine())
    renders: list[int] = []

    def render(adapters: list[str], aliases: list[str]) -> bytes:
        renders.append(1)
        return repr((adapters, aliases)).encode()

    for i in range(500):
        await router.models_body(f"t{i}", render)
    assert len(router.models._bodies) <= 64
    assert await router.models_body(None, render) == await router.models_body(None, render)
    assert len(renders) == 501
