"""A lease ending in a cancelled request (a client gone: Starlette cancels the request's
scope) still takes its version out of the engine when it was the last one: the router
and the engine cannot end up disagreeing about what is resident (review L2)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio

from server.adapters import AdapterRouter
from server.engine.base import LoraHandle
from tests.adapters import make_adapter
from tests.fakes import FakeEngine, lease_endings
from tests.unit.test_registry import open_registry


class _SlowRemovals(FakeEngine):
    async def remove_lora(self, lora_id: int) -> None:
        await asyncio.sleep(0.01)  # the engine answers later: a point a cancel can hit
        await super().remove_lora(lora_id)


async def test_a_cancelled_request_still_releases_the_engine(tmp_path: Path) -> None:
    roots = tmp_path / "allowed"
    reg = open_registry(tmp_path, roots, tmp_path / "registry.db")
    reg.register("a", str(make_adapter(roots / "a1", seed=1)))
    engine = _SlowRemovals()
    router = AdapterRouter("tiny", reg, None, engine)
    target = await router.resolve("tiny:a")
    loaded: list[LoraHandle] = []
    with anyio.CancelScope() as scope:
        async with router.lease(target) as handle:
            assert handle is not None
            loaded.append(handle)
            # A swap makes this version unreachable while the request runs; then the
            # client leaves: every await in the scope now raises (level cancellation).
            reg.register("a", str(make_adapter(roots / "a2", seed=2)), create=False)
            scope.cancel()
    await lease_endings(router)
    assert router.loaded() == []
    assert engine.removed == [loaded[0].lora_id], "the router dropped it, the engine kept it"


async def test_resolving_loads_nothing_so_churn_cannot_evict_before_the_lease(
    tmp_path: Path,
) -> None:
    """Review L3: a version is loaded when its request takes the lease, not when the name
    is resolved, so another request's load cannot evict it in between (and load it twice)."""
    roots = tmp_path / "allowed"
    reg = open_registry(tmp_path, roots, tmp_path / "registry.db")
    for name, seed in (("a", 1), ("b", 2)):
        reg.register(name, str(make_adapter(roots / name, seed=seed)))
    engine = FakeEngine()
    router = AdapterRouter("tiny", reg, None, engine, max_resident=1)
    first, second = await router.resolve("tiny:a"), await router.resolve("tiny:b")
    assert engine.loaded == []
    async with router.lease(first):
        pass
    async with router.lease(second):
        pass
    await lease_endings(router)
    assert [h.name for h in engine.loaded] == ["a@1", "b@1"]
