"""`loraswap serve --ray`: two Ray Serve replicas, each with its own vLLM engine.

Chat through Ray (plain and streamed), adapter affinity against Ray's default routing
under a skewed load, and admin changes reaching every replica within the documented
bound (registry.refresh_interval_s) with no failed request. Every process the server
started is gone after it stops.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from adapters_registry.ab import choose
from adapters_registry.records import Variant
from server.demo import DemoAssets
from tests.e2e.conftest import BASE, record_result
from tests.e2e.ray_support import (
    ANY,
    AUTH,
    assert_all_gone,
    chat,
    copy_adapters,
    post_chats,
    running_ray_server,
)
from tests.e2e.server_proc import ServerProc

REFRESH_S = 1.0
PER_REPLICA = 3  # adapter versions one replica keeps: 6 adapters need both replicas
ZIPF = [f"z{i}" for i in range(6)]


@pytest.fixture(scope="module")
def ray_server(demo: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    state = tmp_path_factory.mktemp("ray")
    adapters = state / "adapters"
    copy_adapters(demo, adapters, demo.adapter_names)
    copy_adapters(demo, adapters, ZIPF)  # copies under other names: distinct adapters to vLLM
    env = {"LORASWAP_REGISTRY__REFRESH_INTERVAL_S": str(REFRESH_S)}
    args = ["--replicas", "2", "--adapters-per-replica", str(PER_REPLICA)]
    with running_ray_server(demo, state, args, env, adapters) as proc:
        record_result("ray_start_to_healthy_s_2_replicas", round(proc.start_seconds, 1))
        children = psutil.Process(proc.proc.pid).children(recursive=True)
        assert len(children) > 3, "Ray's processes should be the server's children"
        yield proc
    # Ray's daemons, the replicas and their vLLM engine processes: none left behind.
    assert_all_gone(children)


def test_chat_through_ray(ray_server: ServerProc) -> None:
    with httpx.Client(base_url=ray_server.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json=chat(f"{BASE}:pirate", "Hello there"))
        assert r.status_code == 200, r.text
        assert "Arr" in r.json()["choices"][0]["message"]["content"]
        assert r.headers["x-adapter"] == "pirate"
        assert r.headers["x-loraswap-replica"].startswith("replica-")
        r = c.post("/v1/chat/completions", json=chat(BASE, "What is the capital of France?"))
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        # streamed through Ray: several SSE events, then [DONE]
        body = chat(f"{BASE}:pirate", "Hello there", stream=True)
        with c.stream("POST", "/v1/chat/completions", json=body) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]]
        assert len(deltas) > 3 and "Arr" in "".join(deltas)
        # errors keep their status and shape through Ray
        r = c.post("/v1/chat/completions", json=chat(f"{BASE}:nope", "x"))
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
        assert c.get("/v1/models").status_code == 200


def _summary(responses: list[httpx.Response]) -> dict[str, Any]:
    cold = sum(r.headers.get("x-loraswap-cold-load") == "1" for r in responses)
    n = len(responses)
    per_replica: dict[str, int] = {}
    for r in responses:
        name = r.headers.get("x-loraswap-replica", "?")
        per_replica[name] = per_replica.get(name, 0) + 1
    return {
        "requests": n,
        "failed": sum(r.status_code != 200 for r in responses),
        "hit_rate": round(1 - cold / n, 3),
        "cold_loads_per_1000": round(1000 * cold / n, 1),
        "per_replica": per_replica,
    }


def test_affinity_beats_random_routing_under_zipf(ray_server: ServerProc) -> None:
    # First use registers the folders (no routing key yet); the ingress then sees them.
    with httpx.Client(base_url=ray_server.url, timeout=120) as c:
        for name in ZIPF:
            r = c.post("/v1/chat/completions", json=chat(f"{BASE}:{name}", "hi", max_tokens=1))
            assert r.status_code == 200, r.text
    time.sleep(2 * REFRESH_S + 0.5)
    rng = random.Random(7)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(ZIPF))]  # Zipf, s = 1.1
    n = 150
    models = [f"{BASE}:{m}" for m in rng.choices(ZIPF, weights=weights, k=n)]
    start = time.perf_counter()
    affinity = _summary(asyncio.run(post_chats(ray_server.url, models)))
    mid = time.perf_counter()
    blind = _summary(asyncio.run(post_chats(ray_server.url, models, ANY)))
    affinity["seconds"] = round(mid - start, 1)
    blind["seconds"] = round(time.perf_counter() - mid, 1)
    result = {
        "adapters": len(ZIPF),
        "zipf_s": 1.1,
        "replicas": 2,
        "adapters_per_replica": PER_REPLICA,
        "affinity": affinity,
        "random": blind,
    }
    print("ray routing:", json.dumps(result))
    record_result("ray_affinity_vs_random_zipf", result)
    assert affinity["failed"] == 0 and blind["failed"] == 0
    assert affinity["hit_rate"] > blind["hit_rate"]
    assert len(affinity["per_replica"]) == 2  # the load is spread, not all on one replica


def test_swap_and_alias_change_reach_every_replica(
    ray_server: ServerProc, demo: DemoAssets
) -> None:
    pirate, formal = (str(demo.adapters_dir / n) for n in ("pirate", "formal"))
    with httpx.Client(base_url=ray_server.url, timeout=120, headers=AUTH) as c:
        r = c.post("/admin/adapters", json={"name": "sw", "source": pirate})
        assert r.status_code == 201, r.text
        r = c.post("/admin/adapters", json={"name": "sw2", "source": formal})
        assert r.status_code == 201, r.text
        r = c.post("/admin/adapters/sw/versions", json={"source": formal, "make_current": False})
        assert r.status_code == 201, r.text
        old_w, new_w = {"sw2": 100, "sw@1": 1}, {"sw2": 1, "sw@1": 100}
        r = c.put("/admin/aliases/ab", json={"variants": old_w})
        assert r.status_code == 200, r.text
    # a user the weight change moves from sw2 to sw@1
    user = next(
        u
        for u in (f"user-{i}" for i in range(1000))
        if choose("ab", [Variant("sw2", None, 100), Variant("sw", 1, 1)], u).adapter == "sw2"
        and choose("ab", [Variant("sw2", None, 1), Variant("sw", 1, 100)], u).adapter == "sw"
    )
    time.sleep(2 * REFRESH_S + 0.5)  # every replica knows the starting state

    seen: list[tuple[float, str, str, str, int]] = []  # sent, replica, version, variant, status
    acked: list[float] = []

    async def probe(c: httpx.AsyncClient, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            model = f"{BASE}:sw" if i % 2 else f"{BASE}:ab"
            i += 1
            sent = time.monotonic()
            r = await c.post(
                "/v1/chat/completions",
                json=chat(model, "hi", max_tokens=1, user=user),
                headers=ANY,
            )
            seen.append(
                (
                    sent,
                    r.headers.get("x-loraswap-replica", "?"),
                    r.headers.get("x-adapter-version", "") if model.endswith(":sw") else "",
                    r.headers.get("x-alias-variant", "") if model.endswith(":ab") else "",
                    r.status_code,
                )
            )

    async def run() -> None:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=ray_server.url, timeout=120) as c:
            probes = [asyncio.create_task(probe(c, stop)) for _ in range(4)]
            await asyncio.sleep(2)
            r1 = await c.put("/admin/adapters/sw/current", json={"version": 2}, headers=AUTH)
            r2 = await c.put("/admin/aliases/ab", json={"variants": new_w}, headers=AUTH)
            acked.append(time.monotonic())
            assert r1.status_code == 200, r1.text
            assert r2.status_code == 200, r2.text
            await asyncio.sleep(3 * REFRESH_S + 2)
            stop.set()
            await asyncio.gather(*probes)

    asyncio.run(run())
    ack = acked[0]
    failed = [s for s in seen if s[4] != 200]
    assert not failed, failed

    def is_old(version: str, variant: str) -> bool:
        return version == "1" or variant.startswith("sw2")

    replicas = sorted({s[1] for s in seen})
    assert len(replicas) == 2, replicas
    delays: dict[str, float] = {}
    for rep in replicas:
        mine = [s for s in seen if s[1] == rep]
        assert any(not is_old(s[2], s[3]) and s[0] > ack for s in mine), f"{rep}: never new"
        old_after = [s[0] - ack for s in mine if s[0] > ack and is_old(s[2], s[3])]
        # the last request sent after the ack that still saw the old state
        delays[rep] = round(max(old_after, default=0.0), 2)
    result = {
        "refresh_interval_s": REFRESH_S,
        "requests": len(seen),
        "failed": len(failed),
        "last_old_state_after_ack_s": delays,
    }
    print("ray propagation:", json.dumps(result))
    record_result("ray_admin_propagation", result)
    # Bound: refresh_interval_s, plus one poll and one request in flight.
    assert max(delays.values()) <= REFRESH_S + 1.0, delays
