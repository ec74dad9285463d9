"""Hot swap under load, restart persistence, and the admin API on the real engine.

The swapped adapter's two versions are the demo's `pirate` (says "Arr") and `formal`
(begins "Dear"), so every response's text proves which version served it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY, record_result, registry_env
from tests.e2e.server_proc import ServerProc, running_server

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
BASE = "smollm2"
PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "How do I reverse a list in Python?",
    "Write a haiku about the sea.",
]


def served_by(version: str, text: str) -> bool:
    return "Arr" in text if version == "1" else text.startswith("Dear")


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)


async def keep_busy(url: str, model: str, load: Load, stop: asyncio.Event, workers: int) -> None:
    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": model,
                            "temperature": 0,
                            "max_tokens": 10,
                            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                        },
                    )
                except httpx.HTTPError as exc:
                    load.failures.append(repr(exc))
                    continue
                load.latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    load.failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                version = r.headers["x-adapter-version"]
                text = r.json()["choices"][0]["message"]["content"]
                load.versions[version] = load.versions.get(version, 0) + 1
                if not served_by(version, text):
                    load.mismatches.append(f"v{version}: {text!r}")

    await asyncio.gather(*(worker(i) for i in range(workers)))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def swap_under_load(server: ServerProc, demo: DemoAssets) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as admin:
        r = await admin.post(
            "/admin/adapters", json={"name": "swap", "source": str(demo.adapters_dir / "pirate")}
        )
        assert r.status_code == 201, r.text
        r = await admin.post(
            "/admin/adapters/swap/versions",
            json={"source": str(demo.adapters_dir / "formal"), "make_current": False},
        )
        assert r.status_code == 201, r.text
        model = f"{BASE}:swap"

        # Baseline: the same load, no swaps.
        baseline, stop = Load(), asyncio.Event()
        task = asyncio.create_task(keep_busy(server.url, model, baseline, stop, workers=4))
        await asyncio.sleep(20)
        stop.set()
        await task

        load, stop = Load(), asyncio.Event()
        task = asyncio.create_task(keep_busy(server.url, model, load, stop, workers=4))
        swap_to_served: list[float] = []
        started = time.monotonic()
        version, swaps = 1, 0
        while time.monotonic() - started < 62 or swaps < 21:
            await asyncio.sleep(2.5)
            version = 2 if version == 1 else 1
            t0 = time.perf_counter()
            r = await admin.put("/admin/adapters/swap/current", json={"version": version})
            assert r.status_code == 200, r.text
            swaps += 1
            # The first response served by the new version: a 1-token request sent at once.
            first = await admin.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": "x"}],
                },
            )
            assert first.headers["x-adapter-version"] == str(version)
            swap_to_served.append(time.perf_counter() - t0)
        # Roll back to version 1 and check it serves.
        r = await admin.put("/admin/adapters/swap/current", json={"version": 1})
        assert r.status_code == 200
        await asyncio.sleep(3)
        stop.set()
        await task
        info = (await admin.get("/admin/adapters/swap")).json()

    assert load.failures == [] and baseline.failures == []
    assert load.mismatches == [] and baseline.mismatches == []
    assert set(load.versions) == {"1", "2"}
    # Only the current version stays in the engine once everything drained.
    assert [v["version"] for v in info["versions"] if v["loaded"]] == [1]
    return {
        "swaps": swaps + 1,
        "requests_during_swaps": len(load.latencies),
        "requests_baseline": len(baseline.latencies),
        "failed": len(load.failures),
        "served_by_version": load.versions,
        "swap_to_first_response_ms": {
            "p50": round(1000 * statistics.median(swap_to_served), 1),
            "max": round(1000 * max(swap_to_served), 1),
        },
        "p99_latency_s": {
            "with_swaps": round(p99(load.latencies), 3),
            "without_swaps": round(p99(baseline.latencies), 3),
        },
    }


def test_hot_swap_under_load_zero_failures(server: ServerProc, demo: DemoAssets) -> None:
    result = asyncio.run(swap_under_load(server, demo))
    record_result("hot_swap", result)
    print("hot swap:", json.dumps(result))


def test_alias_routes_real_adapters(server: ServerProc, demo: DemoAssets) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for name in ("pirate", "formal"):
            r = c.post(
                "/admin/adapters",
                headers=AUTH,
                json={"name": f"ab-{name}", "source": str(demo.adapters_dir / name)},
            )
            assert r.status_code == 201, r.text
        r = c.put(
            "/admin/aliases/support-bot",
            headers=AUTH,
            json={"variants": {"ab-pirate@1": 50, "ab-formal": 50}},
        )
        assert r.status_code == 200, r.text
        for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
            first = None
            for _ in range(2):
                resp = c.post(
                    "/v1/chat/completions",
                    json={
                        "model": "smollm2:support-bot",
                        "user": user,
                        "temperature": 0,
                        "max_tokens": 8,
                        "messages": [{"role": "user", "content": "Hello"}],
                    },
                )
                assert resp.status_code == 200
                variant = resp.headers["x-alias-variant"]
                first = first or variant
                assert variant == first  # sticky
                text = resp.json()["choices"][0]["message"]["content"]
                assert ("Arr" in text) if variant == "ab-pirate@1" else text.startswith("Dear")


def test_kill_9_and_restart_keeps_registry(
    demo: DemoAssets, adapters_dir: Path, tmp_path: Path
) -> None:
    env = registry_env(demo, tmp_path)
    with running_server(
        demo.base_dir, adapters_dir, tmp_path / "a.log", env=env, dtype="bfloat16"
    ) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=120) as c:
            for name in ("pirate", "formal"):
                assert (
                    c.post(
                        "/admin/adapters",
                        json={"name": f"k-{name}", "source": str(demo.adapters_dir / name)},
                    ).status_code
                    == 201
                )
            assert (
                c.post(
                    "/admin/adapters/k-pirate/versions",
                    json={"source": str(demo.adapters_dir / "shout")},
                ).status_code
                == 201
            )
            assert c.put("/admin/adapters/k-pirate/current", json={"version": 1}).status_code == 200
            assert (
                c.put("/admin/aliases/k-bot", json={"variants": {"k-formal": 1}}).status_code == 200
            )
        # kill -9: no shutdown hook runs; only what was committed survives.
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=30)
    with (
        running_server(
            demo.base_dir, adapters_dir, tmp_path / "b.log", env=env, dtype="bfloat16"
        ) as srv,
        httpx.Client(base_url=srv.url, timeout=120) as c,
    ):
        info = c.get("/admin/adapters/k-pirate", headers=AUTH).json()
        assert info["current_version"] == 1
        assert [v["version"] for v in info["versions"]] == [1, 2]
        models = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert {"smollm2:k-pirate", "smollm2:k-formal", "smollm2:k-bot"} <= models

        def ask(model: str) -> str:
            r = c.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "temperature": 0,
                    "max_tokens": 12,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                },
            )
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["message"]["content"])

        assert "Arr" in ask("smollm2:k-pirate")
        assert ask("k-bot").startswith("Dear")
