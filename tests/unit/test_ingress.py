"""The Ray ingress's admission (server/scaleout/ingress.py), without Ray (review H1, H5): the same
`forward` the Ray deployment runs, in a small FastAPI app, with a replica called
in-process (the real app on the fake engine, through server/scaleout/placement.py's call_asgi)
that records what it was asked to route and load."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from server.app import create_app
from server.scaleout.ingress import Gate, forward
from server.scaleout.placement import HttpRequest, ResponseStart, call_asgi
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine

ADMIN_KEY = "admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BODY_LIMIT = 64 * 1024


@dataclass
class World:
    client: httpx.AsyncClient
    keys: dict[str, str]
    calls: list[tuple[str, str | None]] = field(default_factory=list)  # (path, key)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    make_base(tmp_path / "base")
    allowed = tmp_path / "allowed"
    settings = Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        home=tmp_path / "home",
        admin_key=ADMIN_KEY,
        allowed_roots=[allowed],
        max_body_bytes=BODY_LIMIT,
        max_adapter_bytes=1024 * 1024,
    )
    replica = create_app(settings, engine=FakeEngine())
    async with replica.router.lifespan_context(replica):
        registry = replica.state.router.registry
        gate = Gate(settings, registry)
        calls: list[tuple[str, str | None]] = []

        async def call(
            request: HttpRequest, key: str | None
        ) -> AsyncIterator[ResponseStart | bytes]:
            calls.append((request.path, key))
            extra = [(b"x-loraswap-replica", b"replica-0")]
            if key is not None:
                extra.append((b"x-loraswap-cold-load", b"1"))
            async for item in call_asgi(replica, request, extra):
                yield item

        ingress = FastAPI()

        @ingress.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
        async def route(request: Request) -> Response:
            return await forward(gate, request, call)

        transport = httpx.ASGITransport(app=ingress, client=("192.0.2.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            keys = {}
            for t in ("a", "b"):
                assert (await client.put(f"/admin/tenants/{t}", headers=ADMIN, json={})).is_success
                r = await client.post(f"/admin/tenants/{t}/keys", headers=ADMIN)
                keys[t] = r.json()["key"]
            source = str(make_adapter(allowed / "a-private", seed=1))
            r = await client.post(
                "/admin/adapters",
                headers=ADMIN,
                json={"name": "a-private", "source": source, "owner": "a"},
            )
            assert r.status_code == 201, r.text
            calls.clear()
            yield World(client, keys, calls)


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_no_key_is_refused_before_routing_and_says_nothing_about_names(
    world: World,
) -> None:
    replies = []
    for model in ("tiny:a-private", "tiny:absent", "a-private", "absent"):
        r = await world.client.post("/v1/chat/completions", json=chat(model))
        replies.append(r)
        assert r.status_code == 401
        assert not [h for h in r.headers if h.startswith("x-loraswap-")]
    assert len({(r.status_code, r.content, tuple(sorted(r.headers.items()))) for r in replies}) == 1
    assert world.calls == []  # no replica asked, nothing routed nor loaded
    bad = {"authorization": "Bearer lsk_nope_nope"}
    r = await world.client.post("/v1/chat/completions", json=chat("a-private"), headers=bad)
    assert r.status_code == 401 and world.calls == []


async def test_another_tenants_private_adapter_is_not_routed_nor_loaded(world: World) -> None:
    b = {"authorization": f"Bearer {world.keys['b']}"}
    private = await world.client.post("/v1/chat/completions", json=chat("a-private"), headers=b)
    absent = await world.client.post("/v1/chat/completions", json=chat("absent"), headers=b)
    assert private.status_code == absent.status_code == 404
    assert private.content == absent.content.replace(b"absent", b"a-private")
    for r in (private, absent):
        assert not [h for h in r.headers if h.startswith("x-loraswap-")]
    assert world.calls == [("/v1/chat/completions", None), ("/v1/chat/completions", None)]
    # Its owner gets it routed by version, with the headers.
    a = {"authorization": f"Bearer {world.keys['a']}"}
    r = await world.client.post("/v1/chat/completions", json=chat("a-private"), headers=a)
    assert r.status_code == 200, r.text
    assert r.headers["x-loraswap-cold-load"] == "1"
    assert r.headers["x-loraswap-replica"] == "replica-0"
    path, key = world.calls[-1]
    assert path == "/v1/chat/completions"
    # The version, and its content digest (replicas key residency on the content).
    assert (
        key is not None and key.startswith("a-private@1+") and len(key) == len("a-private@1+") + 16
    )


async def test_bodies_are_limited_at_the_ingress(world: World) -> None:
    pulled = 0

    async def drip() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(1000):
            pulled += 16 * 1024
            yield b"x" * 16 * 1024

    # The upload limit is for the admin, on the upload routes only: refused unread.
    r = await world.client.post("/admin/adapters/upload", content=drip())
    assert r.status_code == 401 and pulled == 0
    r = await world.client.post("/x/upload", content=drip(), headers=ADMIN)
    assert r.status_code == 413
    assert BODY_LIMIT < pulled <= BODY_LIMIT + 16 * 1024
    assert world.calls == []
