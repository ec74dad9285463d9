"""The server's edge under attack (issue 14, review H1, H2, M6, L7): body limits while
streaming, the upload limit only for the admin on the two upload routes, /metrics behind a
key with labels from route templates, open mode only for local callers that no proxy
relays, and the early replies (413, drain) with their request id and log line.

Through the real app with the fake engine, over httpx's ASGI transport, which hands the
request body to the app chunk by chunk as the app asks for it: what the tests count as
"read" is what the server pulled from the client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine

ADMIN_KEY = "admin-key"
METRICS_KEY = "metrics-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BODY_LIMIT = 64 * 1024
ADAPTER_LIMIT = 1024 * 1024
UPLOAD_LIMIT = ADAPTER_LIMIT + 2 * 1024 * 1024  # multipart overhead allowance
CHUNK = 16 * 1024
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


def make_settings(tmp_path: Path, **extra: object) -> Settings:
    if not (tmp_path / "base").exists():
        make_base(tmp_path / "base")
        make_adapter(tmp_path / "adapters" / "pirate")
    values: dict[str, object] = {
        "served_model_name": "tiny",
        "model": tmp_path / "base",
        "adapters_dir": tmp_path / "adapters",
        "home": tmp_path / "home",
        "max_body_bytes": BODY_LIMIT,
        "max_adapter_bytes": ADAPTER_LIMIT,
        **extra,
    }
    return Settings.model_validate(values)


@asynccontextmanager
async def serve(
    settings: Settings, peer: tuple[str, int] = ("127.0.0.1", 50000)
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings, engine=FakeEngine())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=peer)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield app, client


class Drip:
    """A chunked request body that counts how much of it the server pulled."""

    def __init__(self, total: int, prefix: bytes = b"") -> None:
        self.total = total
        self.prefix = prefix
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.prefix:
            self.pulled += len(self.prefix)
            yield self.prefix
        while self.pulled < self.total:
            self.pulled += CHUNK
            yield b"x" * CHUNK


@pytest.fixture
def requests_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="loraswap.requests"):
        yield caplog


def logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "loraswap.requests"]


# H1: body limits -------------------------------------------------------------------


async def test_upload_limit_is_not_given_to_any_path_ending_in_upload(tmp_path: Path) -> None:
    async with serve(make_settings(tmp_path, admin_key=ADMIN_KEY)) as (_, c):
        for path in ("/x/upload", "/v1/upload", "/admin/adapters/pirate/upload"):
            r = await c.post(path, content=b"x" * (BODY_LIMIT + 1), headers=ADMIN)
            assert r.status_code == 413, (path, r.status_code)
            assert r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    "path", ["/admin/adapters/upload", "/admin/adapters/pirate/versions/upload"]
)
@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Bearer nope"}, 403)],
)
async def test_upload_without_the_admin_key_is_refused_before_any_byte_is_read(
    tmp_path: Path, path: str, headers: dict[str, str], status: int
) -> None:
    async with serve(make_settings(tmp_path, admin_key=ADMIN_KEY)) as (_, c):
        drip = Drip(UPLOAD_LIMIT)
        r = await c.post(path, content=drip, headers=headers)
        assert r.status_code == status, r.text
        # Nothing pulled: no multipart parsed, nothing spooled to disk, nothing in RAM.
        assert drip.pulled == 0
        declared = {**headers, "content-type": "multipart/form-data; boundary=b"}
        r = await c.post(path, content=b"x" * (BODY_LIMIT + 1), headers=declared)
        assert r.status_code == status


async def test_admin_upload_gets_the_large_limit_and_is_cut_while_streaming(
    tmp_path: Path,
) -> None:
    async with serve(make_settings(tmp_path, admin_key=ADMIN_KEY)) as (_, c):
        adapter = make_adapter(tmp_path / "up", seed=7)
        files = {
            "adapter_config": (adapter / "adapter_config.json").read_bytes(),
            "adapter_model": (adapter / "adapter_model.safetensors").read_bytes(),
        }
        padding = {"sha256": "", "pad": "p" * (2 * BODY_LIMIT)}  # past the small limit
        r = await c.post(
            "/admin/adapters/upload",
            headers=ADMIN,
            data={"name": "uploaded", **padding},
            files=files,
        )
        assert r.status_code == 201, r.text
        # A file part that never ends: parsed (and spooled) only up to the limit.
        part = (
            b'--b\r\nContent-Disposition: form-data; name="adapter_model"; filename="m"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n"
        )
        drip = Drip(4 * UPLOAD_LIMIT, prefix=part)
        multipart = {**ADMIN, "content-type": "multipart/form-data; boundary=b"}
        r = await c.post("/admin/adapters/upload", headers=multipart, content=drip)
        assert r.status_code == 413
        assert UPLOAD_LIMIT < drip.pulled <= UPLOAD_LIMIT + CHUNK + len(part)


async def test_chunked_body_is_cut_as_soon_as_it_passes_the_limit(
    tmp_path: Path, requests_log: pytest.LogCaptureFixture
) -> None:
    async with serve(make_settings(tmp_path)) as (_, c):
        drip = Drip(100 * BODY_LIMIT)
        r = await c.post(
            "/v1/completions",
            content=drip,
            headers={"x-request-id": "big-1", "content-type": "application/json"},
        )
        assert r.status_code == 413
        assert BODY_LIMIT < drip.pulled <= BODY_LIMIT + CHUNK
        # L7: the early reply carries its request id and is logged.
        assert r.headers["x-request-id"] == "big-1"
        assert any(e["request_id"] == "big-1" and e["status"] == 413 for e in logged(requests_log))
        # A body within the limit, chunked, still works: nothing is held back.
        r = await c.post(
            "/v1/completions",
            content=Chunks(json.dumps(COMPLETION).encode()),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text


class Chunks:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 7):
            yield self.data[i : i + 7]


# L7: early replies carry x-request-id and are logged -----------------------------


async def test_declared_too_large_and_drain_replies_have_request_id_and_log_line(
    tmp_path: Path, requests_log: pytest.LogCaptureFixture
) -> None:
    async with serve(make_settings(tmp_path)) as (app, c):
        r = await c.post(
            "/v1/completions", content=b"x" * (BODY_LIMIT + 1), headers={"x-request-id": "l7-413"}
        )
        assert r.status_code == 413
        assert r.headers["x-request-id"] == "l7-413"
        app.state.lifecycle.draining = True
        r = await c.post("/v1/completions", json=COMPLETION, headers={"x-request-id": "l7-503"})
        assert r.status_code == 503
        assert r.headers["x-request-id"] == "l7-503"
        assert r.headers["retry-after"] == "1"
        # The health and metrics paths stay open while draining, but only those exact paths.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/healthz")).status_code == 503
    statuses = {e["request_id"]: e["status"] for e in logged(requests_log)}
    assert statuses["l7-413"] == 413
    assert statuses["l7-503"] == 503


# H2: /metrics -------------------------------------------------------------------------


async def test_metrics_needs_the_metrics_key_or_the_admin_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, admin_key=ADMIN_KEY, metrics_key=METRICS_KEY)
    async with serve(settings) as (_, c):
        assert (await c.get("/metrics")).status_code == 401
        r = await c.get("/metrics", headers={"authorization": "Bearer nope"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        for key in (METRICS_KEY, ADMIN_KEY):
            r = await c.get("/metrics", headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200
            assert "loraswap_requests_total" in r.text or "loraswap_requests" in r.text
        # A tenant key is no metrics key: per-tenant usage is the operator's to see.
        await c.put("/admin/tenants/acme", headers=ADMIN, json={})
        tenant_key = (await c.post("/admin/tenants/acme/keys", headers=ADMIN)).json()["key"]
        r = await c.get("/metrics", headers={"authorization": f"Bearer {tenant_key}"})
        assert r.status_code == 401
    # With only an admin key, the admin key scrapes.
    async with serve(make_settings(tmp_path, admin_key=ADMIN_KEY)) as (_, c):
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers=ADMIN)).status_code == 200


async def test_metrics_without_any_key_only_for_open_mode_local_callers(tmp_path: Path) -> None:
    async with serve(make_settings(tmp_path)) as (_, c):
        assert (await c.get("/metrics")).status_code == 200
        relayed = {"x-forwarded-for": "203.0.113.9"}
        assert (await c.get("/metrics", headers=relayed)).status_code == 403
    async with serve(make_settings(tmp_path), peer=("192.0.2.7", 4000)) as (_, c):
        assert (await c.get("/metrics")).status_code == 403


async def test_metrics_series_come_from_route_templates_only(tmp_path: Path) -> None:
    async with serve(make_settings(tmp_path, admin_key=ADMIN_KEY)) as (_, c):
        before = (await c.get("/metrics", headers=ADMIN)).text
        for i in range(1000):
            r = await c.post(f"/v1/completions{i}", json=COMPLETION)
            assert r.status_code == 404
        r = await c.get("/v1/completions")  # 405: not a route either
        assert r.status_code == 405
        after = (await c.get("/metrics", headers=ADMIN)).text
        assert series(after) == series(before)
        r = await c.post("/v1/completions", json=COMPLETION, headers=ADMIN)
        assert r.status_code == 200
        r = await c.post("/v1/completions", content=b"{", headers=ADMIN)  # a 400 is observed
        assert r.status_code == 400
        text = (await c.get("/metrics", headers=ADMIN)).text
    routes = {
        line.split('route="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("loraswap_requests_total{")
    }
    assert routes == {"completions"}


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")}


# M6: open mode and proxies ----------------------------------------------------------


@pytest.mark.parametrize(
    "relay",
    [
        {"x-forwarded-for": "203.0.113.9"},
        {"forwarded": "for=203.0.113.9"},
        {"x-real-ip": "203.0.113.9"},
    ],
)
async def test_open_mode_refuses_requests_relayed_by_a_proxy(
    tmp_path: Path, relay: dict[str, str]
) -> None:
    async with serve(make_settings(tmp_path)) as (_, c):
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200
        r = await c.post("/v1/completions", json=COMPLETION, headers=relay)
        assert r.status_code == 401
        assert "proxy" in r.json()["error"]["message"]
        assert (await c.get("/v1/models", headers=relay)).status_code == 401


async def test_open_mode_refuses_non_loopback_peers(tmp_path: Path) -> None:
    async with serve(make_settings(tmp_path), peer=("192.0.2.7", 4000)) as (_, c):
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 401
    async with serve(make_settings(tmp_path), peer=("::1", 4000)) as (_, c):
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200
    # Opened deliberately: anyone, relayed or not.
    opened = make_settings(tmp_path, host="0.0.0.0", unsafe_allow_open_network=True)
    async with serve(opened, peer=("192.0.2.7", 4000)) as (_, c):
        r = await c.post(
            "/v1/completions", json=COMPLETION, headers={"x-forwarded-for": "203.0.113.9"}
        )
        assert r.status_code == 200
    # The admin key works through a proxy, open mode or not.
    keyed = make_settings(tmp_path, admin_key=ADMIN_KEY)
    async with serve(keyed, peer=("192.0.2.7", 4000)) as (_, c):
        r = await c.post(
            "/v1/completions", json=COMPLETION, headers={**ADMIN, "x-real-ip": "203.0.113.9"}
        )
        assert r.status_code == 200
