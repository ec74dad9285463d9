"""Overload and fairness on the real engine (issue: tenants and protection).

Overload: ~10x what this box serves, for 30 s: only 200, 429 and 503 come back, memory
stays bounded, and service is normal right after. Fairness: tenant B's p50 latency while
tenant A floods, against B alone. Figures go to build/results/overload.json; the fairness
bound asserted here is deliberately loose (timings on a shared 2-core box are noisy).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY, record_result, registry_env
from tests.e2e.server_proc import running_server

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
SHORT = {
    "model": "smollm2",
    "max_tokens": 8,
    "ignore_eos": True,
    "messages": [{"role": "user", "content": "Say hello."}],
}


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return float(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])) / 2**20


async def flood(url: str, key: str, rate: float, seconds: float) -> Counter[int]:
    """Open loop: `rate` requests per second whatever the answers, like real traffic."""
    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=limits, headers={"authorization": f"Bearer {key}"}
    ) as c:

        async def one() -> None:
            try:
                r = await c.post("/v1/chat/completions", json=SHORT)
                statuses[r.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[-1] += 1
                print("transport error:", repr(exc))

        tasks = []
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < seconds:
            tasks.append(asyncio.create_task(one()))
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
    return statuses


async def latencies(url: str, key: str, count: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(
        base_url=url, timeout=120, headers={"authorization": f"Bearer {key}"}
    ) as c:
        for _ in range(count):
            t0 = time.perf_counter()
            r = await c.post("/v1/chat/completions", json=SHORT)
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - t0)
    return out


def test_overload_and_fairness(demo: DemoAssets, adapters_dir: Path, tmp_path: Path) -> None:
    env = {**registry_env(demo, tmp_path), "LORASWAP_MAX_IN_FLIGHT": "24"}
    with (
        running_server(
            demo.base_dir, adapters_dir, tmp_path / "s.log", env=env, dtype="bfloat16"
        ) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        keys = {}
        for tenant, limits in (("a", {"max_concurrent": 16}), ("b", {"max_concurrent": 16})):
            assert c.put(f"/admin/tenants/{tenant}", headers=ADMIN, json=limits).is_success
            keys[tenant] = c.post(f"/admin/tenants/{tenant}/keys", headers=ADMIN).json()["key"]

        # What the box serves: a closed loop of 4 for 10 s.
        async def capacity() -> float:
            start = time.perf_counter()
            done = await asyncio.gather(*(latencies(srv.url, keys["a"], 5) for _ in range(4)))
            return sum(len(d) for d in done) / (time.perf_counter() - start)

        served_rps = asyncio.run(capacity())
        rss_before = tree_rss_mb(srv.proc.pid)
        statuses = asyncio.run(flood(srv.url, keys["a"], rate=10 * served_rps, seconds=30))
        rss_after = tree_rss_mb(srv.proc.pid)
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses[200] > 0 and statuses[429] + statuses[503] > 0
        assert rss_after - rss_before < 300, (rss_before, rss_after)
        recovered = time.perf_counter()
        assert asyncio.run(latencies(srv.url, keys["b"], 1))
        recovered_s = time.perf_counter() - recovered

        # Fairness: B alone, then B while A floods at its concurrency limit.
        alone = asyncio.run(latencies(srv.url, keys["b"], 10))

        async def contended() -> list[float]:
            stop = asyncio.Event()

            async def hog() -> None:
                async with httpx.AsyncClient(
                    base_url=srv.url, timeout=120, headers={"authorization": f"Bearer {keys['a']}"}
                ) as h:
                    while not stop.is_set():
                        await h.post("/v1/chat/completions", json=SHORT)

            hogs = [asyncio.create_task(hog()) for _ in range(16)]
            await asyncio.sleep(3)
            try:
                return await latencies(srv.url, keys["b"], 10)
            finally:
                stop.set()
                await asyncio.gather(*hogs)

        flooded = asyncio.run(contended())
    ratio = statistics.median(flooded) / statistics.median(alone)
    result = {
        "served_rps_closed_loop_4": round(served_rps, 2),
        "flood_rps": round(10 * served_rps, 2),
        "flood_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "rss_mb_before_after": [round(rss_before), round(rss_after)],
        "first_request_after_flood_s": round(recovered_s, 3),
        "b_p50_alone_s": round(statistics.median(alone), 3),
        "b_p50_while_a_floods_s": round(statistics.median(flooded), 3),
        "fairness_ratio": round(ratio, 2),
    }
    record_result("overload", result)
    print("overload:", json.dumps(result))
    assert ratio < 6, result
