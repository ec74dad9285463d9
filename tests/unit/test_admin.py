"""The admin API and hot-swap semantics, against a fake engine (fast)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.databases import registry_settings
from tests.fakes import FakeEngine, reply
from tests.testclient import ClientResponse

KEY = "s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}


def settings(tmp_path: Path, **extra: Any) -> Settings:
    if not (tmp_path / "base").exists():
        make_base(tmp_path / "base")
    (tmp_path / "allowed").mkdir(exist_ok=True)
    return Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        home=tmp_path / "home",
        admin_key=KEY,
        allowed_roots=[tmp_path / "allowed"],
        **extra,
    )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(tmp_path: Path, engine: FakeEngine, database: str | Path) -> Iterator[TestClient]:
    """On each registry backend (conftest.py): every test using it runs on both."""
    app = create_app(settings(tmp_path, **registry_settings(database)), engine=engine)
    with TestClient(app) as c:
        yield c


def register(client: TestClient, name: str, path: Path, **extra: object) -> ClientResponse:
    return client.post(
        "/admin/adapters", headers=AUTH, json={"name": name, "source": str(path), **extra}
    )


def chat(client: TestClient, model: str, **extra: object) -> ClientResponse:
    return client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            **extra,
        },
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer nope"}, 403), ({"authorization": "Basic x"}, 401)],
)
def test_admin_requires_key(client: TestClient, headers: dict[str, str], status: int) -> None:
    r = client.get("/admin/adapters", headers=headers)
    assert r.status_code == status
    assert r.json()["error"]["type"] in ("authentication_error", "permission_error")


def test_admin_disabled_without_configured_key(tmp_path: Path, engine: FakeEngine) -> None:
    s = settings(tmp_path).model_copy(update={"admin_key": None})
    with TestClient(create_app(s, engine=engine)) as c:
        r = c.get("/admin/adapters", headers=AUTH)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "admin_disabled"


def test_register_swap_rollback_and_headers(
    client: TestClient, tmp_path: Path, engine: FakeEngine
) -> None:
    allowed = tmp_path / "allowed"
    r = register(client, "pirate", make_adapter(allowed / "v1", seed=1))
    assert r.status_code == 201, r.text
    assert r.json()["current_version"] == 1
    r = chat(client, "tiny:pirate")
    assert (r.headers["x-adapter"], r.headers["x-adapter-version"]) == ("pirate", "1")
    assert r.json()["choices"][0]["message"]["content"] == reply("pirate@1", 8)

    r = client.post(
        "/admin/adapters/pirate/versions",
        headers=AUTH,
        json={"source": str(make_adapter(allowed / "v2", seed=2))},
    )
    assert r.status_code == 201
    assert r.json()["version"] == 2
    r = chat(client, "pirate")
    assert r.headers["x-adapter-version"] == "2"
    assert r.json()["choices"][0]["message"]["content"] == reply("pirate@2", 8)
    # v1 had no running request: released from the engine at once, its id never reused.
    ids = [h.lora_id for h in engine.loaded]
    assert engine.removed == [ids[0]]
    assert len(set(ids)) == len(ids)

    r = client.put("/admin/adapters/pirate/current", headers=AUTH, json={"version": 1})
    assert r.status_code == 200
    assert chat(client, "pirate").headers["x-adapter-version"] == "1"
    info = client.get("/admin/adapters/pirate", headers=AUTH).json()
    assert [(v["version"], v["loaded"]) for v in info["versions"]] == [(1, True), (2, False)]


def test_register_errors(client: TestClient, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    outside = make_adapter(tmp_path / "outside")
    cases = [
        (str(allowed / ".." / "outside"), 403, "path_outside_roots"),
        (str(outside), 403, "path_outside_roots"),
        (str(make_adapter(allowed / "r64", rank=64)), 422, "adapter_rank_too_large"),
        (str(make_adapter(allowed / "alien", hidden_scale=2)), 422, "adapter_incompatible"),
        (str(allowed / "nothing"), 400, "invalid_source"),
    ]
    for source, status, code in cases:
        r = client.post("/admin/adapters", headers=AUTH, json={"name": "x", "source": source})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), source
    r = client.post("/admin/adapters", headers=AUTH, json={"name": "Bad/Name", "source": "x"})
    assert r.status_code == 422
    assert client.get("/admin/adapters", headers=AUTH).json()["data"] == []
    assert client.get("/health").status_code == 200


def test_register_twice_is_409(client: TestClient, tmp_path: Path) -> None:
    path = make_adapter(tmp_path / "allowed" / "a")
    assert register(client, "a", path).status_code == 201
    r = register(client, "a", path)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "already_exists")


def test_upload(client: TestClient, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "src")
    files = {
        "adapter_config": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
        "adapter_model": (
            "adapter_model.safetensors",
            (src / "adapter_model.safetensors").read_bytes(),
        ),
    }
    r = client.post("/admin/adapters/upload", headers=AUTH, data={"name": "up"}, files=files)
    assert r.status_code == 201, r.text
    assert r.json()["versions"][0]["source"] == "upload"
    assert chat(client, "tiny:up").status_code == 200
    r = client.post(
        "/admin/adapters/up/versions/upload", headers=AUTH, data={"sha256": "0" * 64}, files=files
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "checksum_mismatch")


def test_aliases(client: TestClient, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    register(client, "pirate", make_adapter(allowed / "p", seed=1))
    register(client, "formal", make_adapter(allowed / "f", seed=2))
    r = client.put(
        "/admin/aliases/support-bot",
        headers=AUTH,
        json={"variants": {"pirate@1": 90, "formal": 10}},
    )
    assert r.status_code == 200, r.text
    seen = {}
    for i in range(200):
        resp = chat(client, "tiny:support-bot", user=f"u{i}")
        assert resp.headers["x-alias"] == "support-bot"
        seen[f"u{i}"] = resp.headers["x-alias-variant"]
        assert resp.json()["model"] == "tiny:support-bot"
    share = sum(v == "pirate@1" for v in seen.values()) / len(seen)
    assert 0.8 < share < 0.97
    # sticky, also through the x-user-id header
    for user in list(seen)[:20]:
        resp = client.post(
            "/v1/chat/completions",
            headers={"x-user-id": user},
            json={
                "model": "support-bot",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 1,
            },
        )
        assert resp.headers["x-alias-variant"] == seen[user]
    ids = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert ids["tiny:support-bot"]["kind"] == "alias"
    # 409 while an alias routes to the adapter; fine once it does not
    r = client.delete("/admin/adapters/formal", headers=AUTH)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "in_use")
    client.put("/admin/aliases/support-bot", headers=AUTH, json={"variants": {"pirate": 1}})
    assert client.delete("/admin/adapters/formal", headers=AUTH).status_code == 200
    r = client.put("/admin/aliases/bad", headers=AUTH, json={"variants": {"pirate@x": 1}})
    assert r.status_code == 422
    r = client.put("/admin/aliases/bad", headers=AUTH, json={"variants": {"pirate": 0}})
    assert r.status_code == 422
    assert client.delete("/admin/aliases/support-bot", headers=AUTH).status_code == 200
    assert chat(client, "tiny:support-bot").status_code == 404


def test_restart_keeps_everything(tmp_path: Path, database: str | Path) -> None:
    allowed = tmp_path / "allowed"
    on = registry_settings(database)
    with TestClient(create_app(settings(tmp_path, **on), engine=FakeEngine())) as c:
        register(c, "pirate", make_adapter(allowed / "p", seed=1))
        c.post(
            "/admin/adapters/pirate/versions",
            headers=AUTH,
            json={"source": str(make_adapter(allowed / "p2", seed=2))},
        )
        c.put("/admin/adapters/pirate/current", headers=AUTH, json={"version": 1})
        c.put("/admin/aliases/bot", headers=AUTH, json={"variants": {"pirate@2": 1}})
        c.put("/admin/adapters/pirate/pin", headers=AUTH, json={"pinned": True})
    engine = FakeEngine()
    with TestClient(create_app(settings(tmp_path, **on), engine=engine)) as c:
        info = c.get("/admin/adapters/pirate", headers=AUTH).json()
        assert (info["current_version"], info["pinned"]) == (1, True)
        assert engine.pinned  # pinned adapters are warmed at start
        assert chat(c, "pirate").headers["x-adapter-version"] == "1"
        assert chat(c, "bot").headers["x-adapter-version"] == "2"


def test_running_request_finishes_on_its_version_then_old_one_is_released(
    tmp_path: Path,
) -> None:
    engine = FakeEngine(token_delay_s=0.01)
    app = create_app(settings(tmp_path), engine=engine)
    allowed = tmp_path / "allowed"

    async def run() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                await c.post(
                    "/admin/adapters",
                    headers=AUTH,
                    json={"name": "p", "source": str(make_adapter(allowed / "1", seed=1))},
                )
                body = {"model": "p", "prompt": "x", "max_tokens": 40}
                slow = asyncio.create_task(c.post("/v1/completions", json=body))
                await asyncio.sleep(0.1)  # the slow request is running on v1
                r = await c.post(
                    "/admin/adapters/p/versions",
                    headers=AUTH,
                    json={"source": str(make_adapter(allowed / "2", seed=2))},
                )
                assert r.status_code == 201
                quick = await c.post("/v1/completions", json={**body, "max_tokens": 2})
                assert quick.headers["x-adapter-version"] == "2"
                assert engine.removed == []  # v1 still has a running request
                old = await slow
                assert old.headers["x-adapter-version"] == "1"
                assert old.json()["choices"][0]["text"].startswith("p@1")
                v1_id = next(h.lora_id for h in engine.loaded if h.name == "p@1")
                assert engine.removed == [v1_id]  # released once drained

    asyncio.run(run())


def test_openapi_documents_admin(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/admin/adapters/{name}/current" in paths
    assert "/admin/aliases/{name}" in paths
    assert json.dumps(paths)  # serialisable


def test_replica_picks_up_admin_changes_made_on_another(
    tmp_path: Path, database: str | Path
) -> None:
    on = registry_settings(database, refresh_interval_s=0.05)
    path = make_adapter(tmp_path / "allowed" / "p")
    one = TestClient(create_app(settings(tmp_path, **on), engine=FakeEngine()))
    two = TestClient(create_app(settings(tmp_path, **on), engine=FakeEngine()))
    with one, two:
        assert chat(two, "pirate").status_code == 404
        assert register(one, "pirate", path).status_code == 201
        deadline = time.monotonic() + 10
        while chat(two, "pirate").status_code != 200:
            assert time.monotonic() < deadline, "replica two never saw the new adapter"
            time.sleep(0.05)
