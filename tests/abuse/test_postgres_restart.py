"""Fault injection: the registry's PostgreSQL server restarted under traffic.

A real server process (fake engine) on a registry in a real PostgreSQL server of its own
(restarting the session's shared one would break the other tests), inference requests in
a loop, then the database stopped and started again. Inference keeps being served from
the in-memory snapshot (no failure at all); an admin write during the outage answers a
clear 503 `registry_unavailable` (not a 500); after the restart writes work again, on a
reconnected connection, and what was written serves.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.abuse.test_kill_server import AUTH, KEY, server
from tests.adapters import make_adapter, make_base
from tests.databases import PostgresServer, PostgresUnavailable


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401

        pg = PostgresServer.start()
    except (ImportError, PostgresUnavailable) as exc:
        from tests.unit.conftest import _unavailable

        _unavailable(str(exc))
        raise  # unreachable: _unavailable skips or fails
    if not pg.restartable:
        pg.stop()
        pytest.skip("LORASWAP_TEST_POSTGRES_URL names a server these tests cannot restart")
    yield pg
    pg.stop()


def _traffic(url: str, stop: threading.Event, results: list[tuple[str, int, str]]) -> None:
    """Chat requests to the base and to an adapter until `stop`; records every answer."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
        i = 0
        while not stop.is_set():
            model = ("tiny", "a1")[i % 2]
            i += 1
            body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
            try:
                r = c.post("/v1/chat/completions", json={**body, "max_tokens": 2})
                results.append((model, r.status_code, r.text[:300]))
            except httpx.TransportError as exc:
                results.append((model, 0, repr(exc)))


def test_postgres_restart_under_traffic(tmp_path: Path, own_postgres: PostgresServer) -> None:
    make_base(tmp_path / "base")
    sources = [make_adapter(tmp_path / "allowed" / f"s{i}", seed=i) for i in range(3)]
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "served_model_name": "tiny",
                "model": str(tmp_path / "base"),
                "home": str(tmp_path / "home"),
                "admin_key": KEY,
                "allowed_roots": [str(tmp_path / "allowed")],
                # The poller also hits the dead database: it must not disturb serving.
                "registry": {
                    "database_url": own_postgres.new_database(),
                    "refresh_interval_s": 0.1,
                },
            }
        )
    )
    with server(settings) as (url, _), httpx.Client(base_url=url, headers=AUTH) as admin:
        r = admin.post("/admin/adapters", json={"name": "a1", "source": str(sources[0])})
        assert r.status_code == 201, r.text
        stop = threading.Event()
        results: list[tuple[str, int, str]] = []
        worker = threading.Thread(target=_traffic, args=(url, stop, results))
        worker.start()
        try:
            time.sleep(0.5)
            own_postgres.halt()
            served_before_outage = len(results)
            time.sleep(0.5)
            r = admin.post("/admin/adapters", json={"name": "a2", "source": str(sources[1])})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "registry_unavailable", r.text
            r = admin.post("/admin/adapters/a1/versions", json={"source": str(sources[2])})
            assert r.status_code == 503, r.text
            time.sleep(0.5)
            served_during_outage = len(results) - served_before_outage
            own_postgres.resume()
            time.sleep(0.3)
        finally:
            stop.set()
            worker.join(timeout=30)
        failures = [x for x in results if x[1] != 200]
        assert not failures, failures[:5]
        assert served_during_outage >= 5, served_during_outage
        # Back: writes work again (the broken connection is replaced) and serve.
        r = admin.post("/admin/adapters", json={"name": "a2", "source": str(sources[1])})
        assert r.status_code == 201, r.text
        body = {"model": "a2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert admin.post("/v1/chat/completions", json=body).status_code == 200
        listed = {a["name"] for a in admin.get("/admin/adapters").json()["data"]}
        assert listed == {"a1", "a2"}
