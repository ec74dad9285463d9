"""Tenants: keys, isolation (404 exactly like absence), quotas, fairness priority."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from adapters_registry.records import TenantRecord
from server.app import create_app
from server.errors import InvalidRequest, Overloaded, RateLimited
from server.quotas import Quotas
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.databases import database_contents, registry_settings
from tests.fakes import FakeEngine
from tests.testclient import ClientResponse

ADMIN = {"authorization": "Bearer admin-key"}


def settings(tmp_path: Path, **extra: Any) -> Settings:
    if not (tmp_path / "base").exists():
        make_base(tmp_path / "base")
    (tmp_path / "allowed").mkdir(exist_ok=True)
    return Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        home=tmp_path / "home",
        admin_key="admin-key",
        allowed_roots=[tmp_path / "allowed"],
        **extra,
    )


@pytest.fixture
def world(tmp_path: Path, database: str | Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """Tenants a and b, each with a private adapter and alias, plus a shared adapter;
    on each registry backend (conftest.py), so every test using it runs on both."""
    allowed = tmp_path / "allowed"
    app = create_app(settings(tmp_path, **registry_settings(database)), engine=FakeEngine())
    with TestClient(app) as c:
        keys = {}
        for t in ("a", "b"):
            assert c.put(f"/admin/tenants/{t}", headers=ADMIN, json={}).status_code == 200
            keys[t] = c.post(f"/admin/tenants/{t}/keys", headers=ADMIN).json()["key"]
            r = c.post(
                "/admin/adapters",
                headers=ADMIN,
                json={
                    "name": f"{t}-private",
                    "source": str(make_adapter(allowed / t, seed=ord(t))),
                    "owner": t,
                },
            )
            assert r.status_code == 201, r.text
            r = c.put(
                f"/admin/aliases/{t}-alias",
                headers=ADMIN,
                json={"variants": {f"{t}-private": 1}, "owner": t},
            )
            assert r.status_code == 200, r.text
        c.post(
            "/admin/adapters",
            headers=ADMIN,
            json={
                "name": "common",
                "source": str(make_adapter(allowed / "c", seed=3)),
                "shared": True,
            },
        )
        yield c, keys


def ask(c: TestClient, model: str, key: str | None) -> ClientResponse:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return c.post(
        "/v1/completions", headers=headers, json={"model": model, "prompt": "x", "max_tokens": 2}
    )


MODELS = [
    "tiny",
    "tiny:a-private",
    "tiny:b-private",
    "tiny:common",
    "tiny:a-alias",
    "tiny:b-alias",
    "b-private",
    "tiny:absent",
]


@pytest.mark.parametrize(("who", "model"), list(itertools.product(["a", "b", "admin"], MODELS)))
def test_isolation_matrix(world: tuple[TestClient, dict[str, str]], who: str, model: str) -> None:
    c, keys = world
    key = "admin-key" if who == "admin" else keys[who]
    r = ask(c, model, key)
    allowed = (
        model in ("tiny", "tiny:common")
        or who == "admin"
        or f":{who}-" in model
        or model == f"{who}-private"
    ) and "absent" not in model
    if allowed:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 404
        # Byte for byte what an absent name gets: no existence leak.
        absent = ask(c, model.replace("private", "nothere").replace("alias", "nothere"), key)
        assert r.json()["error"] | {"message": ""} == absent.json()["error"] | {"message": ""}
        assert r.json()["error"]["message"] == f"The model '{model}' does not exist"


def test_models_list_is_filtered(world: tuple[TestClient, dict[str, str]]) -> None:
    c, keys = world
    ids = {
        m["id"]
        for m in c.get("/v1/models", headers={"authorization": f"Bearer {keys['a']}"}).json()[
            "data"
        ]
    }
    assert ids == {"tiny", "tiny:a-private", "tiny:a-alias", "tiny:common"}


def test_keys_required_once_they_exist(world: tuple[TestClient, dict[str, str]]) -> None:
    c, keys = world
    assert ask(c, "tiny", None).status_code == 401
    assert ask(c, "tiny", None).json()["error"]["code"] == "missing_api_key"
    bad = ask(c, "tiny", keys["a"][:-1] + ("A" if keys["a"][-1] != "A" else "B"))
    assert (bad.status_code, bad.json()["error"]["code"]) == (401, "invalid_api_key")
    tenant = c.get("/admin/tenants/a", headers=ADMIN).json()
    key_id = tenant["key_ids"][0]
    assert keys["a"].startswith(f"lsk_{key_id}_")
    assert c.delete(f"/admin/tenants/a/keys/{key_id}", headers=ADMIN).status_code == 200
    assert ask(c, "tiny", keys["a"]).status_code == 401


def test_keys_are_stored_hashed(
    world: tuple[TestClient, dict[str, str]], database: str | Path
) -> None:
    _, keys = world
    db = database_contents(database)
    assert keys["a"].split("_")[1].encode() in db  # the key id is there: we looked right
    # lsk_<id>_<secret>; the secret may contain "_" itself (it is base64url): split once.
    secret = keys["a"].split("_", 2)[2]
    assert len(secret) >= 32
    assert secret.encode() not in db


def test_alias_cannot_expose_another_tenants_adapter(
    world: tuple[TestClient, dict[str, str]],
) -> None:
    c, _ = world
    r = c.put(
        "/admin/aliases/sneaky", headers=ADMIN, json={"variants": {"b-private": 1}, "owner": "a"}
    )
    assert r.status_code == 422
    r = c.put(
        "/admin/aliases/sneaky", headers=ADMIN, json={"variants": {"b-private": 1}, "shared": True}
    )
    assert r.status_code == 422


def test_tenant_that_owns_things_cannot_be_deleted(
    world: tuple[TestClient, dict[str, str]],
) -> None:
    c, _ = world
    assert c.delete("/admin/tenants/a", headers=ADMIN).status_code == 409


def test_open_mode_refuses_non_loopback_bind(tmp_path: Path) -> None:
    no_admin = settings(tmp_path, host="0.0.0.0").model_copy(update={"admin_key": None})
    app = create_app(no_admin, engine=FakeEngine())
    with pytest.raises(RuntimeError, match="unsafe-allow-open-network"), TestClient(app):
        pass
    # With an admin key it starts closed: only the admin key is accepted until tenants exist.
    with TestClient(create_app(settings(tmp_path, host="0.0.0.0"), engine=FakeEngine())) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 401
        r = c.post(
            "/v1/completions", headers=ADMIN, json={"model": "tiny", "prompt": "x", "max_tokens": 1}
        )
        assert r.status_code == 200
    app = create_app(
        settings(tmp_path, host="0.0.0.0", unsafe_allow_open_network=True), engine=FakeEngine()
    )
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200


def test_keys_make_non_loopback_bind_fine(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path), engine=FakeEngine())) as c:
        c.put("/admin/tenants/t", headers=ADMIN, json={})
        c.post("/admin/tenants/t/keys", headers=ADMIN)
    with TestClient(create_app(settings(tmp_path, host="0.0.0.0"), engine=FakeEngine())) as c:
        assert c.get("/health").status_code == 200


# -- quotas ------------------------------------------------------------------------------


def tenant(max_concurrent: int | None = None, tpm: int | None = None) -> TenantRecord:
    return TenantRecord(
        name="t", max_concurrent=max_concurrent, tokens_per_minute=tpm, created_at=0
    )


def test_concurrency_limit_and_priority() -> None:
    quotas = Quotas(max_in_flight=100)
    t = tenant(max_concurrent=2)
    first, second = quotas.admit(t, 1), quotas.admit(t, 1)
    assert (first.priority, second.priority) == (0, 1)
    with pytest.raises(RateLimited) as info:
        quotas.admit(t, 1)
    assert info.value.retry_after == 1
    first.release()
    first.release()  # idempotent
    assert quotas.admit(t, 1).priority == 1


def test_token_bucket_refills_and_refunds() -> None:
    now = [0.0]
    quotas = Quotas(max_in_flight=100, clock=lambda: now[0])
    t = tenant(tpm=600)  # 10 tokens per second
    ticket = quotas.admit(t, 500)
    ticket.used_tokens = 100  # 400 unused: given back
    ticket.release()
    quotas.admit(t, 500).release()
    with pytest.raises(RateLimited) as info:
        quotas.admit(t, 400)  # 100 + 400 refund... exhausted below 400 now
    assert info.value.retry_after is not None and info.value.retry_after > 0
    now[0] += 60
    quotas.admit(t, 600)
    with pytest.raises(InvalidRequest, match="lower max_tokens"):
        quotas.admit(t, 601)


def test_global_bound() -> None:
    quotas = Quotas(max_in_flight=2)
    quotas.admit(None, 1)
    quotas.admit(tenant(), 1)
    with pytest.raises(Overloaded):
        quotas.admit(None, 1)


def test_429_over_http_with_retry_after(tmp_path: Path) -> None:
    engine = FakeEngine(token_delay_s=0.02)
    app = create_app(settings(tmp_path), engine=engine)

    async def run() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                await c.put("/admin/tenants/t", headers=ADMIN, json={"max_concurrent": 1})
                key = (await c.post("/admin/tenants/t/keys", headers=ADMIN)).json()["key"]
                body = {"model": "tiny", "prompt": "x", "max_tokens": 10}
                auth = {"authorization": f"Bearer {key}"}
                results = await asyncio.gather(
                    *(c.post("/v1/completions", json=body, headers=auth) for _ in range(3))
                )
                after = await c.post("/v1/completions", json=body, headers=auth)
                return [*results, after]

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses[:3])
    assert statuses == [200, 429, 429]
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert responses[3].status_code == 200  # the slot was released
    assert engine.priorities == [0, 0]


def test_revoking_every_key_does_not_reopen_the_server(
    world: tuple[TestClient, dict[str, str]],
) -> None:
    c, keys = world
    for t in ("a", "b"):
        key_id = c.get(f"/admin/tenants/{t}", headers=ADMIN).json()["key_ids"][0]
        assert c.delete(f"/admin/tenants/{t}/keys/{key_id}", headers=ADMIN).status_code == 200
    assert ask(c, "tiny:a-private", None).status_code == 401
    assert ask(c, "tiny:a-private", keys["a"]).status_code == 401


def test_changing_quotas_keeps_keys(world: tuple[TestClient, dict[str, str]]) -> None:
    c, keys = world
    r = c.put("/admin/tenants/a", headers=ADMIN, json={"max_concurrent": 3})
    assert r.json()["key_ids"]
    assert ask(c, "tiny:a-private", keys["a"]).status_code == 200
