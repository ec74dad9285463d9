"""Kill -9 with an A/B experiment running, then a restart on the same database (SQLite
and PostgreSQL): every exposure and feedback acknowledged before the kill is there.

What "acknowledged" means (README: Experiments, durability):

- feedback: its POST answered 200 (it is committed before the answer);
- an exposure: seen through the API (GET /v1/exposures/{id}, or feedback on it, which
  flush the queue to the database before looking), or its response ended more than
  `flush_interval_s` (plus a margin for writing the batch) before the kill: the exposure
  log writes its queue at least that often. Exposures of the last `flush_interval_s` may
  be lost; the test counts them but asserts nothing about them.

The real server process (real engine) is killed with SIGKILL: no shutdown hook runs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY, registry_env
from tests.e2e.server_proc import running_server
from tests.unit.conftest import database, postgres_server, store_backend

__all__ = ["database", "postgres_server", "store_backend"]  # SQLite and PostgreSQL

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
ALIAS = "kd-bot"
FLUSH_S = 1.0
# Writing one small batch takes milliseconds; the margin covers a loaded 2-core box.
MARGIN_S = 2.0


def server_env(demo: DemoAssets, state: Path, database: str | Path) -> dict[str, str]:
    env = {**registry_env(demo, state), "LORASWAP_EXPERIMENTS__FLUSH_INTERVAL_S": str(FLUSH_S)}
    if not isinstance(database, Path):
        del env["LORASWAP_REGISTRY_DB"]
        env["LORASWAP_REGISTRY__DATABASE_URL"] = database
    return env


def chat(c: httpx.Client, user: str) -> str:
    r = c.post(
        "/v1/chat/completions",
        json={
            "model": ALIAS,
            "user": user,
            "temperature": 0,
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hello"}],
        },
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def exposure(c: httpx.Client, response_id: str) -> httpx.Response:
    return c.get(f"/v1/exposures/{response_id}", headers=AUTH)


def feedback(c: httpx.Client, response_id: str, label: int) -> dict[str, Any]:
    body = {"response_id": response_id, "metric": "thumbs", "label": label}
    r = c.post("/v1/feedback", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_kill_9_keeps_acknowledged_exposures_and_feedback(
    demo: DemoAssets, database: str | Path, tmp_path: Path
) -> None:
    env = server_env(demo, tmp_path, database)
    seen: dict[str, str] = {}  # response id -> arm, acknowledged by the API
    by_time: list[str] = []  # acknowledged by flush_interval_s having passed
    liked: dict[str, int] = {}  # response id -> label, acknowledged feedback
    arms: dict[str, str] = {}  # response id -> arm (from feedback or exposure answers)
    unacknowledged: list[str] = []
    with running_server(demo.base_dir, None, tmp_path / "a.log", env=env, dtype="bfloat16") as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for name in ("pirate", "formal"):
                source = str(demo.adapters_dir / name)
                r = c.post(
                    "/admin/adapters", headers=AUTH, json={"name": f"kd-{name}", "source": source}
                )
                assert r.status_code == 201, r.text
            variants = {"kd-pirate@1": 1, "kd-formal@1": 1}
            r = c.put(f"/admin/aliases/{ALIAS}", headers=AUTH, json={"variants": variants})
            assert r.status_code == 200, r.text
            # 1. Acknowledged through the API: a lookup or feedback (each flushes).
            for i in range(16):
                rid = chat(c, f"user-{i}")
                if i % 2:
                    got = exposure(c, rid)
                    assert got.status_code == 200, got.text
                    seen[rid] = arms[rid] = got.json()["variant"]
                else:
                    answer = feedback(c, rid, label=i % 4 // 2)
                    liked[rid], arms[rid] = answer["label"], answer["variant"]
            # 2. Acknowledged by time: nothing asks about these, and nothing flushes the
            # queue from here on: the writer's own rounds must have put them in the
            # database once flush_interval_s has passed.
            by_time = [chat(c, f"user-{i}") for i in range(16, 24)]
            time.sleep(FLUSH_S + MARGIN_S)
            # 3. Not acknowledged: responses of the last moment (may be lost).
            unacknowledged = [chat(c, f"user-{i}") for i in range(24, 28)]
            # 4. Feedback answered right before the kill, on a response whose exposure
            # is already in the database (so its lookup does not flush the queue).
            last = next(iter(seen))
            answer = feedback(c, last, label=1)
            liked[last] = answer["label"]
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=30)

    with (
        running_server(demo.base_dir, None, tmp_path / "b.log", env=env, dtype="bfloat16") as srv,
        httpx.Client(base_url=srv.url, timeout=120) as c,
    ):
        for rid, arm in seen.items():
            got = exposure(c, rid)
            assert got.status_code == 200 and got.json()["variant"] == arm, (rid, got.text)
        for rid in [*by_time, *liked]:  # by_time: the writer's rounds, nothing else
            got = exposure(c, rid)
            assert got.status_code == 200, (rid, got.text)
            arms.setdefault(rid, got.json()["variant"])
            assert got.json()["variant"] == arms[rid]
        report = c.get(f"/admin/aliases/{ALIAS}/experiment", headers=AUTH).json()
        counted = {
            arm["variant"]: (
                arm["metrics"]["thumbs"]["label"]["count"],
                arm["metrics"]["thumbs"]["label"]["positives"],
            )
            for arm in report["variants"]
            if arm["metrics"].get("thumbs")
        }
        expected = {
            arm: (
                sum(1 for rid in liked if arms[rid] == arm),
                sum(label for rid, label in liked.items() if arms[rid] == arm),
            )
            for arm in set(arms[rid] for rid in liked)
        }
        assert counted == expected
        lost = sum(exposure(c, rid).status_code == 404 for rid in unacknowledged)
        acknowledged = len({*seen, *by_time, *liked})
        assert report["exposures"] >= acknowledged
        print(
            "kill -9:",
            json.dumps(
                {
                    "backend": "sqlite" if isinstance(database, Path) else "postgres",
                    "acknowledged_exposures": acknowledged,
                    "acknowledged_feedback": len(liked),
                    "unacknowledged_lost": f"{lost}/{len(unacknowledged)}",
                }
            ),
        )
