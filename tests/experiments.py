"""A world for the experiment tests: the real app on a fake engine, tenants a and b,
adapters pirate and formal (shared), alias bot = pirate@1 : formal@1 (shared)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from adapters_registry.experiments import ExperimentStore, Exposure
from server.app import create_app
from server.experiments.log import ExposureLog
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.databases import registry_settings
from tests.fakes import FakeEngine
from tests.testclient import ClientResponse

ADMIN = {"authorization": "Bearer admin-key"}
HI = [{"role": "user", "content": "hi"}]


def settings(tmp_path: Path, database: str | Path, **extra: Any) -> Settings:
    if not (tmp_path / "base").exists():
        make_base(tmp_path / "base")
    (tmp_path / "allowed").mkdir(exist_ok=True)
    return Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        home=tmp_path / "home",
        admin_key="admin-key",
        allowed_roots=[tmp_path / "allowed"],
        **registry_settings(database),
        **extra,
    )


class World:
    def __init__(self, client: TestClient, keys: dict[str, str]) -> None:
        self.c = client
        self.keys = keys

    def auth(self, who: str) -> dict[str, str]:
        return ADMIN if who == "admin" else {"authorization": f"Bearer {self.keys[who]}"}

    def chat(
        self, who: str, user: str | None = "u1", model: str = "bot", **extra: Any
    ) -> ClientResponse:
        body: dict[str, Any] = {"model": model, "messages": HI, "max_tokens": 4, **extra}
        if user is not None:
            body["user"] = user
        return self.c.post("/v1/chat/completions", json=body, headers=self.auth(who))

    def feedback(self, who: str, **body: Any) -> ClientResponse:
        return self.c.post("/v1/feedback", json=body, headers=self.auth(who))

    @property
    def app(self) -> Any:
        return self.c.app

    def flush(self) -> None:
        log: ExposureLog = self.app.state.exposures
        self.c.portal.call(log.flush)  # type: ignore[union-attr]

    def exposures(self, alias: str = "bot") -> list[Exposure]:
        self.flush()
        store: ExperimentStore = self.app.state.exposures.store
        return sorted(store.exposures(alias), key=lambda e: e.created_at)


@contextmanager
def open_world(tmp_path: Path, database: str | Path, **extra: Any) -> Iterator[World]:
    """Tenants a and b; adapters pirate and formal, shared; alias bot = pirate 1 : formal 1,
    shared; and a plain adapter request for contrast."""
    allowed = tmp_path / "allowed"
    engine = extra.pop("engine", None) or FakeEngine()
    app = create_app(settings(tmp_path, database, **extra), engine=engine)
    with TestClient(app) as c:
        keys = {}
        for t in ("a", "b"):
            assert c.put(f"/admin/tenants/{t}", headers=ADMIN, json={}).status_code == 200
            keys[t] = c.post(f"/admin/tenants/{t}/keys", headers=ADMIN).json()["key"]
        for i, name in enumerate(("pirate", "formal")):
            r = c.post(
                "/admin/adapters",
                headers=ADMIN,
                json={
                    "name": name,
                    "source": str(make_adapter(allowed / name, seed=i + 1)),
                    "shared": True,
                },
            )
            assert r.status_code == 201, r.text
        r = c.put(
            "/admin/aliases/bot",
            headers=ADMIN,
            json={"variants": {"pirate@1": 1, "formal@1": 1}, "shared": True},
        )
        assert r.status_code == 200, r.text
        yield World(c, keys)
