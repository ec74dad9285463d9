"""Engine residency and the download cache (loadtests memory.md): the router holds in the
engine (and so protects in the cache) no more versions than the engine keeps, drops the
least recently used idle ones, and a cache full only of versions in use is a 503 with
Retry-After, not a 413."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters_registry import SourceChanged
from adapters_registry.errors import CacheFull
from adapters_registry.registry import Registry
from server.adapters import AdapterRouter
from server.app import create_app
from server.errors import describe
from tests.adapters import make_adapter
from tests.fakes import FakeEngine
from tests.unit.test_api import tiny_settings
from tests.unit.test_registry import open_registry

N = 5  # adapters served by URL


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[str, Path, int]]:
    """N same-size adapters served over HTTP: (url, folder, one adapter's bytes)."""
    root = tmp_path / "www"
    for i in range(N):
        make_adapter(root / f"u{i}", seed=i)
    size = sum(p.stat().st_size for p in (root / "u0").iterdir())
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, size
    server.shutdown()
    server.server_close()


def _registry(tmp_path: Path, url: str, cache_bytes: int) -> Registry:
    reg = open_registry(tmp_path, tmp_path / "allowed", tmp_path / "registry.db", cache_bytes)
    for i in range(N):
        reg.register(f"u{i}", f"{url}/u{i}")
    return reg


async def _request(router: AdapterRouter, name: str) -> None:
    async with router.lease(await router.resolve(f"tiny:{name}")):
        pass


async def test_residency_is_bounded_by_what_the_engine_keeps(
    tmp_path: Path, www: tuple[str, Path, int]
) -> None:
    url, _, size = www
    reg = _registry(tmp_path, url, cache_bytes=3 * size)
    engine = FakeEngine()
    router = AdapterRouter("tiny", reg, None, engine, max_resident=2)
    try:
        for _ in range(2):
            for i in range(N):
                await _request(router, f"u{i}")
                assert len(router.loaded()) <= 2
                assert reg.cache.usage() <= reg.cache.max_bytes
        # The least recently used idle version left the engine, the 2 latest stayed.
        assert [h.name for h, _ in router.loaded()] == ["u3@1", "u4@1"]
        resident = {h.lora_id for h, _ in router.loaded()}
        assert set(engine.removed) == {h.lora_id for h in engine.loaded} - resident
        assert router.in_use_shas() == {reg.adapter(f"u{i}").current.content_digest for i in (3, 4)}  # type: ignore[union-attr]
        # Using a resident version makes it the most recent: u3 stays, u4 goes.
        await _request(router, "u3")
        await _request(router, "u0")
        assert [h.name for h, _ in router.loaded()] == ["u3@1", "u0@1"]
    finally:
        reg.close()


async def test_a_cache_smaller_than_the_engine_never_blocks_idle_adapters(
    tmp_path: Path, www: tuple[str, Path, int]
) -> None:
    """memory.md's run: max_cpu_loras 16, a cache of 3 adapters, 8 URL adapters: every
    request beyond the third adapter failed with 413. Idle residents give way."""
    url, _, size = www
    reg = _registry(tmp_path, url, cache_bytes=3 * size)
    router = AdapterRouter("tiny", reg, None, FakeEngine(), max_resident=16)
    try:
        for _ in range(2):
            for i in range(N):
                await _request(router, f"u{i}")
                assert reg.cache.usage() <= reg.cache.max_bytes
        assert len(router.loaded()) <= 3
    finally:
        reg.close()


async def test_a_cache_full_of_adapters_in_use_is_503_with_retry_after(
    tmp_path: Path, www: tuple[str, Path, int]
) -> None:
    url, _, size = www
    reg = _registry(tmp_path, url, cache_bytes=2 * size)
    engine = FakeEngine()
    router = AdapterRouter("tiny", reg, None, engine, max_resident=16)
    try:
        held = [router.lease(await router.resolve(f"tiny:u{i}")) for i in (0, 1)]
        for lease in held:
            await lease.__aenter__()
        with pytest.raises(CacheFull) as info:
            await _request(router, "u2")
        kind, body = describe(info.value)
        assert (kind.status, body["error"]["code"]) == (503, "adapter_cache_full")  # type: ignore[index]
        assert info.value.retry_after is not None and info.value.retry_after > 0
        assert engine.removed == []  # versions in use are never dropped
        assert [h.name for h, _ in router.loaded()] == ["u0@1", "u1@1"]
        for lease in held:
            await lease.__aexit__(None, None, None)
        await _request(router, "u2")  # room once a request ended
        assert "u2@1" in [h.name for h, _ in router.loaded()]
        assert reg.cache.usage() <= reg.cache.max_bytes
    finally:
        reg.close()


async def test_an_evicted_version_is_downloaded_and_verified_again(
    tmp_path: Path, www: tuple[str, Path, int]
) -> None:
    url, root, size = www
    reg = _registry(tmp_path, url, cache_bytes=2 * size)
    engine = FakeEngine()
    router = AdapterRouter("tiny", reg, None, engine, max_resident=1)
    try:
        first = reg.adapter("u0").current  # type: ignore[union-attr]
        assert first is not None
        for i in (0, 1, 2):
            await _request(router, f"u{i}")
        assert reg.cache.get(first.content_digest) is None  # evicted
        await _request(router, "u0")  # downloaded again
        cached = reg.cache.get(first.content_digest)
        assert cached is not None
        weights = (cached / "adapter_model.safetensors").read_bytes()
        assert hashlib.sha256(weights).hexdigest() == first.sha256
        assert engine.loaded[-1].path == str(cached)
        # Other weights at the URL now: refused, never served as u0@1.
        make_adapter(root / "u1", seed=99)
        for i in (2, 3):
            await _request(router, f"u{i}")
        assert reg.cache.get(reg.adapter("u1").current.content_digest) is None  # type: ignore[union-attr]
        with pytest.raises(SourceChanged):
            await _request(router, "u1")
    finally:
        reg.close()


def test_http_503_and_retry_after_when_the_cache_is_full_of_adapters_in_use(
    tmp_path: Path, www: tuple[str, Path, int]
) -> None:
    url, _, size = www
    settings = tiny_settings(
        tmp_path,
        download_cache_bytes=size,
        sources={"http_allowed_networks": ["127.0.0.1/32"]},  # served over loopback
    )
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        router: AdapterRouter = client.app.state.router  # type: ignore[attr-defined]
        for i in (0, 1):
            router.registry.register(f"u{i}", f"{url}/u{i}")
        portal = client.portal
        assert portal is not None
        lease = router.lease(portal.call(router.resolve, "tiny:u0"))
        portal.call(lease.__aenter__)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        response = client.post("/v1/chat/completions", json={**body, "model": "tiny:u1"})
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("service_unavailable_error", "adapter_cache_full")
        portal.call(lease.__aexit__, None, None, None)
        response = client.post("/v1/chat/completions", json={**body, "model": "tiny:u1"})
        assert response.status_code == 200, response.text
