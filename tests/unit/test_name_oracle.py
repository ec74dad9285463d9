"""Another tenant's private name and a name that does not exist are answered alike:
the same bytes (tests/unit/test_tenants.py) and the same work, hence the same time
within noise (review M8). The work is what is asserted; the times are recorded."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from fastapi.testclient import TestClient

from server.app import create_app
from tests.adapters import make_adapter
from tests.fakes import FakeEngine
from tests.unit.test_tenants import ADMIN, settings


def test_private_and_absent_names_cost_the_same(tmp_path: Path) -> None:
    (tmp_path / "adapters").mkdir()
    s = settings(tmp_path, adapters_dir=tmp_path / "adapters")
    with TestClient(create_app(s, engine=FakeEngine())) as c:
        for t in ("a", "b"):
            assert c.put(f"/admin/tenants/{t}", headers=ADMIN, json={}).status_code == 200
        key_b = c.post("/admin/tenants/b/keys", headers=ADMIN).json()["key"]
        r = c.post(
            "/admin/adapters",
            headers=ADMIN,
            json={"name": "secret", "owner": "a",
                  "source": str(make_adapter(tmp_path / "allowed" / "s"))},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        router = c.app.state.router  # type: ignore[attr-defined]
        catalog = router.catalog
        looked: list[str] = []
        real_get = catalog.get

        def counting_get(name: str) -> object:
            looked.append(name)
            return real_get(name)

        catalog.get = counting_get
        times: dict[str, list[float]] = {"secret": [], "absent": []}
        bodies = {}
        for _ in range(40):
            for name in times:
                start = time.perf_counter()
                r = c.post(
                    "/v1/chat/completions",
                    headers={"authorization": f"Bearer {key_b}"},
                    json={"model": name, "messages": [{"role": "user", "content": "hi"}]},
                )
                times[name].append(time.perf_counter() - start)
                assert r.status_code == 404
                bodies[name] = r.json()["error"]
        assert looked.count("secret") == looked.count("absent") == 40
        assert (
            bodies["secret"]["message"].replace("secret", "absent") == bodies["absent"]["message"]
        )
        medians = {n: round(1000 * statistics.median(t), 3) for n, t in times.items()}
        out = Path("build/results")
        out.mkdir(parents=True, exist_ok=True)
        (out / "name_oracle_ms.json").write_text(json.dumps(medians))
