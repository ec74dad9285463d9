"""Routing key, per-replica residency and the in-process ASGI call used by the Ray Serve
deployment (server/scaleout/ray_serve.py), against the fake engine. Fast, no Ray."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from adapters_registry.ab import choose
from server.app import create_app
from server.scaleout.placement import (
    HttpRequest,
    Residency,
    ResponseStart,
    call_asgi,
    collect,
    parse_key,
    routing_key,
)
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine, lease_endings

KEY = "s3cret"
AUTH = [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]


def settings(tmp_path: Path) -> Settings:
    make_base(tmp_path / "base")
    root = tmp_path / "adapters"
    make_adapter(root / "pirate", seed=1)
    make_adapter(root / "formal", seed=2)
    return Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        adapters_dir=root,
        home=tmp_path / "home",
        admin_key=KEY,
    )


def body(model: str, **extra: object) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    ).encode()


def post(path: str, payload: bytes, method: str = "POST") -> HttpRequest:
    return HttpRequest(method, path, headers=list(AUTH), body=payload)


async def test_routing_key_follows_registry_aliases_and_swaps(tmp_path: Path) -> None:
    s = settings(tmp_path)
    engine = FakeEngine()
    app = create_app(s, engine=engine)
    async with app.router.lifespan_context(app):
        registry = app.state.router.registry
        # base, bad bodies, names the registry does not know yet: no key (any replica)
        assert routing_key(registry, "tiny", body("tiny")) is None
        assert routing_key(registry, "tiny", b"{not json") is None
        assert routing_key(registry, "tiny", b'{"model": 3}') is None
        assert routing_key(registry, "tiny", body("other:pirate")) is None
        assert routing_key(registry, "tiny", body("tiny:pirate")) is None
        # the first request registers the folder; then its key is the concrete version
        start, _ = await collect(call_asgi(app, post("/v1/chat/completions", body("pirate"))))
        assert start.status == 200
        # the key carries the content digest (review H3): no cache confuses two contents
        pirate = registry.adapter("pirate").current
        pirate_key = f"pirate@1+{pirate.content_digest[:16]}"
        assert routing_key(registry, "tiny", body("tiny:pirate")) == pirate_key
        assert routing_key(registry, "tiny", body("pirate")) == pirate_key
        assert parse_key(pirate_key) == ("pirate", 1, pirate.content_digest[:16])
        await collect(call_asgi(app, post("/v1/chat/completions", body("formal"))))
        # an A/B alias: the key is the arm this user gets, as the replica will choose it
        r = await collect(
            call_asgi(
                app,
                post(
                    "/admin/aliases/bot",
                    json.dumps({"variants": {"pirate@1": 50, "formal": 50}}).encode(),
                    method="PUT",
                ),
            )
        )
        assert r[0].status == 200, r[1]
        alias = registry.alias("bot")
        for user in ("ann", "bob", "cy", "dee"):
            arm = choose("bot", alias.variants, user)
            digest = registry.adapter(arm.adapter).current.content_digest
            want = f"{arm.adapter}@1+{digest[:16]}"
            assert routing_key(registry, "tiny", body("tiny:bot", user=user)) == want
            assert routing_key(registry, "tiny", body("bot"), user_header=user) == want
            start, _ = await collect(
                call_asgi(app, post("/v1/chat/completions", body("tiny:bot", user=user)))
            )
            version = dict(start.headers)[b"x-alias-variant"].decode()
            assert f"{version.split('@')[0]}@1" == want.split("+")[0]


def test_residency_is_lru_with_hits_and_cold_loads() -> None:
    r = Residency(capacity=2)
    assert r.touch("a@1") == (False, [])
    assert r.touch("b@1") == (False, [])
    assert r.touch("a@1") == (True, [])
    assert r.touch("c@1") == (False, ["b@1"])  # b least recently used
    assert r.touch("a@1") == (True, [])
    assert (r.hits, r.cold) == (2, 3)
    assert list(r.keys) == ["c@1", "a@1"]
    assert parse_key("my.adapter@12") == ("my.adapter", 12, None)
    assert parse_key("my.adapter@12+00ff") == ("my.adapter", 12, "00ff")


async def test_call_asgi_streams_and_adds_headers(tmp_path: Path) -> None:
    engine = FakeEngine()
    app = create_app(settings(tmp_path), engine=engine)
    async with app.router.lifespan_context(app):
        stream = call_asgi(
            app,
            post("/v1/chat/completions", body("pirate", stream=True)),
            [(b"x-loraswap-replica", b"replica-0")],
        )
        items = [item async for item in stream]
        start = items[0]
        assert isinstance(start, ResponseStart) and start.status == 200
        headers = dict(start.headers)
        assert headers[b"x-loraswap-replica"] == b"replica-0"
        assert headers[b"x-adapter"] == b"pirate"
        assert headers[b"content-type"].startswith(b"text/event-stream")
        text = b"".join(i for i in items[1:] if isinstance(i, bytes)).decode()
        assert len(items) > 3  # several chunks: streamed, not buffered
        assert text.rstrip().endswith("data: [DONE]")
        # errors keep their status and OpenAI shape
        start, raw = await collect(call_asgi(app, post("/v1/chat/completions", body("nope"))))
        assert start.status == 404
        assert json.loads(raw)["error"]["code"] == "model_not_found"
        start, _ = await collect(call_asgi(app, HttpRequest("GET", "/health")))
        assert start.status == 200


async def test_call_asgi_closed_early_aborts_the_stream(tmp_path: Path) -> None:
    engine = FakeEngine(token_delay_s=0.01)
    app = create_app(settings(tmp_path), engine=engine)
    async with app.router.lifespan_context(app):
        payload = body("pirate", stream=True, max_tokens=200)
        stream = call_asgi(app, post("/v1/chat/completions", payload))
        async for item in stream:
            if isinstance(item, bytes):
                break
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()  # the client went away
        assert len(engine.aborted) == 1
        assert not engine.running


async def test_unload_waits_for_leases_and_load_reloads(tmp_path: Path) -> None:
    engine = FakeEngine()
    app = create_app(settings(tmp_path), engine=engine)
    async with app.router.lifespan_context(app):
        router = app.state.router
        await collect(call_asgi(app, post("/v1/chat/completions", body("pirate"))))
        assert router.is_loaded("pirate", 1)
        target = await router.resolve("tiny:pirate")
        async with router.lease(target) as handle:
            await router.unload("pirate", 1)
            assert handle is not None and handle.lora_id not in engine.removed
            assert not router.is_loaded("pirate", 1)
        await lease_endings(router)
        assert handle.lora_id in engine.removed  # left when its last lease ended
        again = await router.load("pirate", 1)
        assert again.lora_id != handle.lora_id and router.is_loaded("pirate", 1)
        await router.unload("pirate", 1)
        assert again.lora_id in engine.removed
        with pytest.raises(Exception, match="not found"):
            await router.load("pirate", 7)
