"""`loraswap serve --ray --min-replicas 1 --max-replicas 2`: Ray Serve's autoscaler adds
a replica (its own vLLM engine) under load and removes it when the load is gone, and no
request fails on the way: not while the new replica starts, not while the old one drains.

Which replicas are alive is read where an operator reads it: the ingress's merged
`/metrics`, whose series carry a `replica` label per live replica (a replica that stops
publishing drops out after `ray.replica_ttl_s`). Local Ray (one node), CPU only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.demo import DemoAssets
from tests.e2e.conftest import BASE, record_result
from tests.e2e.ray_support import AUTH, chat, running_ray_server
from tests.e2e.server_proc import ServerProc

UPSCALE_DELAY_S = 2.0
DOWNSCALE_DELAY_S = 10.0
REPLICA_TTL_S = 5.0
USERS = 8  # closed loop, streamed: 8 ongoing requests against a target of 2 per replica
SCALE_TIMEOUT_S = 300.0  # a new replica starts a vLLM engine: tens of seconds on 2 cores


@pytest.fixture(scope="module")
def server(demo: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    state = tmp_path_factory.mktemp("rayscale")
    env = {
        "LORASWAP_RAY__UPSCALE_DELAY_S": str(UPSCALE_DELAY_S),
        "LORASWAP_RAY__DOWNSCALE_DELAY_S": str(DOWNSCALE_DELAY_S),
        "LORASWAP_RAY__BEAT_INTERVAL_S": "1",
        "LORASWAP_RAY__REPLICA_TTL_S": str(REPLICA_TTL_S),
    }
    args = ["--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "2"]
    with running_ray_server(demo, state, args, env) as proc:
        yield proc


def live_replicas(c: httpx.Client) -> set[str]:
    r = c.get("/metrics", headers=AUTH)
    assert r.status_code == 200, r.text
    return {
        s.labels["replica"]
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if "replica" in s.labels
    }


def wait_for(c: httpx.Client, count: int, timeout_s: float) -> float:
    """Seconds until exactly `count` replicas are live; fails after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if len(live_replicas(c)) == count:
            return time.monotonic() - start
        time.sleep(1.0)
    pytest.fail(f"not {count} live replicas after {timeout_s:.0f} s: {live_replicas(c)}")


async def _stream(c: httpx.AsyncClient, model: str, i: int) -> str:
    """One streamed chat; "ok", or what went wrong (status, error frame, no [DONE])."""
    body = chat(model, f"Tell me about the number {i}.", max_tokens=24, stream=True)
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return f"status {r.status_code}: {(await r.aread())[:200]!r}"
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    if any('"error"' in line for line in lines):
        return f"error frame: {[line for line in lines if 'error' in line][:1]}"
    return "ok" if lines and lines[-1] == "data: [DONE]" else f"unfinished: {lines[-1:]}"


async def _load(url: str, users: int, until: asyncio.Event, outcomes: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:

        async def user(u: int) -> None:
            i = 0
            while not until.is_set():
                model = f"{BASE}:pirate" if u % 2 else BASE
                outcomes.append(await _stream(c, model, u * 1000 + i))
                i += 1

        await asyncio.gather(*(user(u) for u in range(users)))


def test_scales_out_under_load_and_back_with_no_failed_request(server: ServerProc) -> None:
    outcomes: list[str] = []
    timeline: dict[str, Any] = {}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        wait_for(c, 1, 60)
        assert live_replicas(c) == {"replica-0"}

        async def scale_up() -> None:
            stop = asyncio.Event()
            load = asyncio.create_task(_load(server.url, USERS, stop, outcomes))
            try:
                timeline["load_to_2_replicas_s"] = round(
                    await asyncio.to_thread(wait_for, c, 2, SCALE_TIMEOUT_S), 1
                )
                # Keep the load on while both serve: the new replica takes requests.
                await asyncio.sleep(10)
            finally:
                stop.set()
                await load

        asyncio.run(scale_up())
        during_load = len(outcomes)

        async def trickle(stop: asyncio.Event) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as a:
                i = 0
                while not stop.is_set():
                    outcomes.append(await _stream(a, BASE, i))
                    i += 1
                    await asyncio.sleep(1.0)

        async def scale_down() -> None:
            # One request at a time while the second replica drains and stops: well under
            # the target of 2 per replica, so one replica is what the autoscaler wants.
            stop = asyncio.Event()
            light = asyncio.create_task(trickle(stop))
            try:
                timeline["idle_to_1_replica_s"] = round(
                    await asyncio.to_thread(
                        wait_for, c, 1, DOWNSCALE_DELAY_S + REPLICA_TTL_S + SCALE_TIMEOUT_S
                    ),
                    1,
                )
            finally:
                stop.set()
                await light

        asyncio.run(scale_down())
    failed = [o for o in outcomes if o != "ok"]
    timeline.update(
        requests_under_load=during_load,
        requests_while_scaling_down=len(outcomes) - during_load,
        failed=len(failed),
    )
    print("ray autoscale:", json.dumps(timeline))
    record_result("ray_autoscale", timeline)
    assert during_load > USERS and len(outcomes) > during_load
    assert not failed, failed[:5]
