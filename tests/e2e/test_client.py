"""`clients.Client` and `clients.AsyncClient` against the real server (real vLLM, model and
adapters): inference, streaming, the admin API, tenants and typed errors.

Runs on the session's server (tests/e2e/conftest.py). Everything it creates is named
`cl-*` and removed at the end of the module, tenants included, so the server is back in
open mode for the tests that follow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    LoraswapError,
    NotFoundError,
    PermissionDeniedError,
    UnprocessableEntityError,
)
from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY
from tests.e2e.server_proc import ServerProc

BASE = "smollm2"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
TENANT = "cl-acme"


def ask(c: Client, model: str, max_tokens: int = 16, **params: object) -> str:
    return c.chat(model, HELLO, max_tokens=max_tokens, temperature=0, **params).text


def capitals(text: str) -> bool:
    letters = [ch for ch in text if ch.isalpha()]
    return len(letters) >= 5 and all(ch.isupper() for ch in letters)


@pytest.fixture(scope="module")
def admin(server: ServerProc) -> Iterator[Client]:
    with Client(server.url, admin_key=ADMIN_KEY, max_retries=0) as c:
        yield c
        _cleanup(c)


def _cleanup(c: Client) -> None:
    for alias in c.list_aliases():
        if alias["name"].startswith("cl-"):
            c.delete_alias(alias["name"])
    for adapter in c.list_adapters():
        if adapter["name"].startswith("cl-"):
            c.delete_adapter(adapter["name"])
    for tenant in c.list_tenants():
        if tenant["name"].startswith("cl-"):
            for key_id in tenant["key_ids"]:
                c.delete_key(tenant["name"], key_id)
            c.delete_tenant(tenant["name"])


def test_chat_stream_completions_models(admin: Client) -> None:
    reply = admin.chat(f"{BASE}:pirate", HELLO, max_tokens=16, temperature=0)
    assert "Arr" in reply.text
    assert reply.body["model"] == f"{BASE}:pirate"
    assert reply.served_by.adapter == "pirate" and reply.served_by.adapter_version == 1
    assert reply.body["usage"]["completion_tokens"] > 0

    assert "Paris" in ask(admin, BASE, 24)
    assert admin.chat(BASE, HELLO, max_tokens=16).served_by.adapter is None

    stream = admin.chat_stream(
        f"{BASE}:shout",
        HELLO,
        max_tokens=16,
        temperature=0,
        stream_options={"include_usage": True},
    )
    assert stream.served_by.adapter == "shout"
    chunks = list(stream)
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert capitals(text), text
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert text == ask(admin, f"{BASE}:shout")  # streamed == not streamed, greedy

    completion = admin.completions(f"{BASE}:formal", "Hello,", max_tokens=8, temperature=0)
    assert completion.text and completion.served_by.adapter == "formal"
    streamed = "".join(
        ch["choices"][0].get("text") or ""
        for ch in admin.completions_stream(f"{BASE}:formal", "Hello,", max_tokens=8, temperature=0)
        if ch["choices"]
    )
    assert streamed == completion.text

    ids = {m["id"] for m in admin.models()}
    assert {BASE, f"{BASE}:pirate", f"{BASE}:formal", f"{BASE}:shout"} <= ids


def test_register_upload_versions_rollback(admin: Client, demo: DemoAssets) -> None:
    info = admin.register_adapter("cl-swap", str(demo.adapters_dir / "pirate"))
    assert info["name"] == "cl-swap" and info["current_version"] == 1
    assert info["versions"][0]["rank"] == 8
    assert "Arr" in ask(admin, f"{BASE}:cl-swap")

    calls: list[tuple[int, int]] = []
    uploaded = admin.upload_adapter(
        "cl-upl",
        demo.adapters_dir / "shout",
        progress=lambda sent, total: calls.append((sent, total)),
    )
    assert uploaded["versions"][0]["source"] == "upload"
    total = calls[-1][1]
    size = sum(
        (demo.adapters_dir / "shout" / f).stat().st_size
        for f in ("adapter_config.json", "adapter_model.safetensors")
    )
    assert total == size and calls[-1][0] == total
    assert [s for s, _ in calls] == sorted(s for s, _ in calls)
    assert capitals(ask(admin, f"{BASE}:cl-upl"))

    with pytest.raises(ConflictError) as exc:
        admin.register_adapter("cl-swap", str(demo.adapters_dir / "formal"))
    assert exc.value.status == 409 and exc.value.code == "already_exists"

    v2 = admin.add_version("cl-swap", str(demo.adapters_dir / "formal"))
    assert v2["version"] == 2
    reply = admin.chat(f"{BASE}:cl-swap", HELLO, max_tokens=16, temperature=0)
    assert reply.text.startswith("Dear") and reply.served_by.adapter_version == 2

    staged = admin.add_version("cl-swap", str(demo.adapters_dir / "shout"), make_current=False)
    assert staged["version"] == 3
    assert admin.get_adapter("cl-swap")["current_version"] == 2

    assert admin.rollback("cl-swap", 1)["current_version"] == 1
    reply = admin.chat(f"{BASE}:cl-swap", HELLO, max_tokens=16, temperature=0)
    assert "Arr" in reply.text and reply.served_by.adapter_version == 1

    assert admin.set_current("cl-swap", 3)["current_version"] == 3
    assert capitals(ask(admin, f"{BASE}:cl-swap"))
    admin.set_current("cl-swap", 1)
    assert admin.delete_version("cl-swap", 3)["version"] == 3
    versions = [v["version"] for v in admin.get_adapter("cl-swap")["versions"]]
    assert versions == [1, 2]


def test_alias_weights(admin: Client, demo: DemoAssets) -> None:
    with contextlib.suppress(ConflictError):
        admin.register_adapter("cl-swap", str(demo.adapters_dir / "pirate"))
    if len(admin.get_adapter("cl-swap")["versions"]) < 2:
        admin.add_version("cl-swap", str(demo.adapters_dir / "formal"), make_current=False)
    alias = admin.set_alias("cl-ab", {"cl-swap@1": 50, "cl-swap@2": 50})
    assert alias["variants"] == {"cl-swap@1": 50, "cl-swap@2": 50}
    assert f"{BASE}:cl-ab" in {m["id"] for m in admin.models() if m.get("kind") == "alias"}

    seen: dict[str, str] = {}
    for i in range(12):
        r = admin.chat(f"{BASE}:cl-ab", HELLO, max_tokens=1, temperature=0, user=f"u{i}")
        assert r.served_by.alias == "cl-ab"
        assert r.served_by.alias_variant in ("cl-swap@1", "cl-swap@2")
        seen[f"u{i}"] = r.served_by.alias_variant or ""
    assert set(seen.values()) == {"cl-swap@1", "cl-swap@2"}  # 2**-11 to fail by chance
    # Sticky: the same user, the same variant, and its weights behind it.
    user, variant = next(iter(seen.items()))
    r = admin.chat(f"{BASE}:cl-ab", HELLO, max_tokens=16, temperature=0, user=user)
    assert r.served_by.alias_variant == variant
    assert ("Arr" in r.text) if variant == "cl-swap@1" else r.text.startswith("Dear")

    admin.set_alias("cl-ab", {"cl-swap@2": 1})  # all of it to formal, at once
    for i in range(3):
        r = admin.chat(f"{BASE}:cl-ab", HELLO, max_tokens=16, temperature=0, user=f"u{i}")
        assert r.served_by.alias_variant == "cl-swap@2" and r.text.startswith("Dear")
    assert admin.delete_alias("cl-ab")["name"] == "cl-ab"
    with pytest.raises(NotFoundError):
        admin.chat(f"{BASE}:cl-ab", HELLO, max_tokens=1)


def test_tenants_and_keys(admin: Client, server: ServerProc, demo: DemoAssets) -> None:
    admin.register_adapter("cl-private", str(demo.adapters_dir / "pirate"))
    admin.put_tenant(TENANT, max_concurrent=2)
    try:
        admin.register_adapter("cl-acme-pirate", str(demo.adapters_dir / "pirate"), owner=TENANT)
        key = admin.create_key(TENANT)
        assert key["key"].startswith("lsk_") and key["tenant"] == TENANT
        with Client(server.url, api_key=key["key"], max_retries=0) as tenant:
            ids = {m["id"] for m in tenant.models()}
            assert f"{BASE}:cl-acme-pirate" in ids and f"{BASE}:pirate" in ids  # own, shared
            assert f"{BASE}:cl-private" not in ids
            assert "Arr" in ask(tenant, f"{BASE}:cl-acme-pirate")
            with pytest.raises(NotFoundError) as private:
                tenant.chat(f"{BASE}:cl-private", HELLO, max_tokens=1)
            with pytest.raises(NotFoundError) as missing:
                tenant.chat(f"{BASE}:cl-no-such", HELLO, max_tokens=1)
            # Another's private adapter is indistinguishable from a missing one.
            assert private.value.status == missing.value.status == 404
            assert private.value.code == missing.value.code == "model_not_found"
            assert admin.get_tenant(TENANT)["key_ids"] == [key["key_id"]]

            # With a tenant, no key is refused (401), a wrong one too.
            with Client(server.url, max_retries=0) as anonymous, pytest.raises(AuthenticationError):
                anonymous.chat(BASE, HELLO, max_tokens=1)
            with (
                Client(server.url, api_key=key["key"][:-4] + "abcd", max_retries=0) as wrong,
                pytest.raises(AuthenticationError) as bad,
            ):
                wrong.chat(BASE, HELLO, max_tokens=1)
            assert bad.value.status == 401 and bad.value.code == "invalid_api_key"

            admin.delete_key(TENANT, key["key_id"])
            with pytest.raises(AuthenticationError):
                tenant.chat(BASE, HELLO, max_tokens=1)
    finally:
        _cleanup(admin)
    with Client(server.url, max_retries=0) as anonymous:  # back in open mode
        assert "Arr" in ask(anonymous, f"{BASE}:pirate")


def test_typed_errors(admin: Client, server: ServerProc, adapters_dir: Path) -> None:
    with pytest.raises(NotFoundError) as nf:
        admin.chat(f"{BASE}:cl-does-not-exist", HELLO, max_tokens=1)
    assert nf.value.status == 404 and nf.value.code == "model_not_found"
    assert nf.value.request_id

    with pytest.raises(UnprocessableEntityError) as rank:
        admin.register_adapter("cl-toobig", str(adapters_dir / "toobig"))
    assert rank.value.status == 422 and rank.value.code == "adapter_rank_too_large"
    with pytest.raises(UnprocessableEntityError) as pickled:
        admin.register_adapter("cl-pickled", str(adapters_dir / "pickled"))
    assert pickled.value.code == "adapter_unsafe_format"
    with pytest.raises(UnprocessableEntityError) as alien:
        admin.register_adapter("cl-alien", str(adapters_dir / "alien"))
    assert alien.value.code == "adapter_incompatible"
    with pytest.raises(PermissionDeniedError) as outside:
        admin.register_adapter("cl-outside", "/etc")
    assert outside.value.status == 403 and outside.value.code == "path_outside_roots"

    with Client(server.url, max_retries=0) as nokey, pytest.raises(AuthenticationError) as e401:
        nokey.list_adapters()
    assert e401.value.status == 401
    with (
        Client(server.url, admin_key="wrong", max_retries=0) as wrong,
        pytest.raises(PermissionDeniedError) as e403,
    ):
        wrong.list_adapters()
    assert e403.value.status == 403 and e403.value.code == "invalid_api_key"
    assert all(isinstance(e, LoraswapError) for e in (nf.value, rank.value, e401.value, e403.value))


async def test_async_client(server: ServerProc, demo: DemoAssets, admin: Client) -> None:
    async with AsyncClient(server.url, admin_key=ADMIN_KEY, max_retries=0) as c:
        reply = await c.chat(f"{BASE}:formal", HELLO, max_tokens=16, temperature=0)
        assert reply.text.startswith("Dear") and reply.served_by.adapter == "formal"

        stream = await c.chat_stream(f"{BASE}:pirate", HELLO, max_tokens=16, temperature=0)
        assert stream.served_by.adapter == "pirate"
        parts = [ch["choices"][0]["delta"].get("content") or "" async for ch in stream]
        assert "Arr" in "".join(parts)

        done = await c.completions(BASE, "The capital of France is", max_tokens=8, temperature=0)
        assert "Paris" in done.text
        ids = {m["id"] for m in await c.models()}
        assert f"{BASE}:shout" in ids

        sent: list[int] = []
        info = await c.upload_adapter(
            "cl-async", demo.adapters_dir / "pirate", progress=lambda s, t: sent.append(s)
        )
        assert info["current_version"] == 1 and sent and sent[-1] > 0
        v2 = await c.upload_version("cl-async", demo.adapters_dir / "shout")
        assert v2["version"] == 2
        r = await c.chat(f"{BASE}:cl-async", HELLO, max_tokens=16, temperature=0)
        assert capitals(r.text) and r.served_by.adapter_version == 2
        assert (await c.rollback("cl-async", 1))["current_version"] == 1
        r = await c.chat(f"{BASE}:cl-async", HELLO, max_tokens=16, temperature=0)
        assert "Arr" in r.text and r.served_by.adapter_version == 1

        with pytest.raises(NotFoundError):
            await c.get_adapter("cl-nope")
        with pytest.raises(NotFoundError):
            await c.chat(f"{BASE}:cl-nope", HELLO, max_tokens=1)
        assert (await c.delete_adapter("cl-async"))["deleted"] is True
