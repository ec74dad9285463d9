"""/v1/models reads the adapters folder once per call, off the event loop (review L6)."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient

from server.app import create_app
from tests.adapters import make_adapter
from tests.fakes import FakeEngine
from tests.unit.test_api import tiny_settings


def test_models_reads_the_folder_once_on_a_worker_thread(tmp_path: Path) -> None:
    make_adapter(tmp_path / "adapters" / "pirate")
    with TestClient(create_app(tiny_settings(tmp_path), engine=FakeEngine())) as c:
        catalog = c.app.state.router.catalog  # type: ignore[attr-defined]
        reads: list[threading.Thread] = []
        real_names = catalog.names

        def names() -> list[str]:
            reads.append(threading.current_thread())
            return real_names()  # type: ignore[no-any-return]

        catalog.names = names
        r = c.get("/v1/models")
        assert r.status_code == 200
        assert "tiny:pirate" in [m["id"] for m in r.json()["data"]]
        assert len(reads) == 1, f"the folder was read {len(reads)} times for one listing"
        r = c.get("/v1/models/pirate")
        assert r.json()["id"] == "tiny:pirate"
        loop = c.portal.call(lambda: threading.current_thread())  # type: ignore[union-attr]
        assert all(t is not loop for t in reads), "the folder was read on the event loop"
