"""Admission before work (issue 14, H4): a request that will be refused costs no
download, no engine load and no tokenization; what a request reserved comes back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.base import LoraHandle
from server.errors import EngineFailure
from tests.adapters import make_adapter
from tests.fakes import FakeEngine
from tests.unit.test_tenants import ADMIN, settings


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine, str]]:
    engine = FakeEngine(max_model_len=2048)
    with TestClient(create_app(settings(tmp_path), engine=engine)) as c:
        r = c.put("/admin/tenants/t", headers=ADMIN, json={"tokens_per_minute": 1000})
        assert r.status_code == 200, r.text
        key = c.post("/admin/tenants/t/keys", headers=ADMIN).json()["key"]
        r = c.post(
            "/admin/adapters",
            headers=ADMIN,
            json={
                "name": "shared1",
                "source": str(make_adapter(tmp_path / "allowed" / "s1", seed=1)),
                "shared": True,
            },
        )
        assert r.status_code == 201, r.text
        yield c, engine, key


def _chat(c: TestClient, key: str, model: str, max_tokens: int) -> int:
    r = c.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}],
              "max_tokens": max_tokens},
    )  # fmt: skip
    return r.status_code


def test_a_request_over_quota_loads_nothing(world: tuple[TestClient, FakeEngine, str]) -> None:
    c, engine, key = world
    # 1,000 tokens per minute: the base with max_tokens 900 passes and uses them...
    assert _chat(c, key, "tiny", 900) == 200
    # ...so the next request is refused before its adapter is loaded or its prompt
    # tokenized (the old code downloaded and loaded the adapter, then answered 429).
    assert _chat(c, key, "tiny:shared1", 900) == 429
    assert engine.loaded == [], "a refused request loaded an adapter"


def test_a_request_that_can_never_fit_is_400_before_work(
    world: tuple[TestClient, FakeEngine, str],
) -> None:
    c, engine, key = world
    assert _chat(c, key, "tiny:shared1", 2000) == 400
    assert engine.loaded == []


class _FailingLoads(FakeEngine):
    async def add_lora(self, lora: LoraHandle) -> None:
        raise EngineFailure("the engine refused the adapter")


def test_a_request_that_never_reaches_the_engine_gives_its_reservation_back(
    tmp_path: Path,
) -> None:
    """Review L1: whatever ends a request before the engine produced a token (here its
    adapter fails to load after admission), what it reserved comes back in full."""
    with TestClient(create_app(settings(tmp_path), engine=_FailingLoads(2048))) as c:
        c.put("/admin/tenants/t", headers=ADMIN, json={"tokens_per_minute": 1000})
        key = c.post("/admin/tenants/t/keys", headers=ADMIN).json()["key"]
        source = make_adapter(tmp_path / "allowed" / "s1", seed=1)
        r = c.post("/admin/adapters", headers=ADMIN,
                   json={"name": "s1", "source": str(source), "shared": True})  # fmt: skip
        assert r.status_code == 201, r.text
        for _ in range(3):  # 3 x 900 > 1000: only passes if each one is refunded
            assert _chat(c, key, "tiny:s1", 900) == 500
        assert _chat(c, key, "tiny", 900) == 200
