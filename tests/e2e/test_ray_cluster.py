"""`loraswap serve --ray --ray-address`: a TWO-NODE Ray cluster on this machine (two
raylets with their own resources, `ray.cluster_utils.Cluster`, as `ray start --head` +
`ray start --address` would make), one replica per node (`--max-replicas-per-node 1`).

Chat through both nodes and the share of requests served warm; a tenant's
`max_concurrent=2` holds across both replicas (the third concurrent request gets 429);
/metrics at the ingress shows both replicas' series; a replica's worker process killed
mid-stream gives that stream an error frame, later requests succeed on the other node,
Ray brings the replica back, and the registry lost nothing. Every process the cluster
and the server started is gone afterwards. Ran on one host only (two Ray nodes), CPU only.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.demo import DemoAssets
from tests.e2e import ray_support
from tests.e2e.conftest import BASE, record_result
from tests.e2e.ray_support import (
    ANY,
    AUTH,
    assert_all_gone,
    copy_adapters,
    post_chats,
    running_ray_server,
)
from tests.e2e.server_proc import ServerProc

REFRESH_S = 1.0
ADAPTERS = [f"c{i}" for i in range(4)]
REPLICA_PROC = "ServeReplica:loraswap:Replica"


@dataclass
class Cluster:
    server: ServerProc
    raylets: dict[int, str]  # raylet pid -> node name
    cluster: Any

    def replica_procs(self) -> dict[str, psutil.Process]:
        """node name -> the worker process running the Replica on it."""
        out = {}
        for pid, node in self.raylets.items():
            for child in psutil.Process(pid).children(recursive=True):
                try:
                    if REPLICA_PROC in " ".join(child.cmdline()) or REPLICA_PROC in child.name():
                        out[node] = child
                except psutil.NoSuchProcess:
                    pass
        return out


@pytest.fixture(scope="module")
def cluster(demo: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from ray.cluster_utils import Cluster as RayCluster

    state = tmp_path_factory.mktemp("raycluster")
    adapters = state / "adapters"
    copy_adapters(demo, adapters, ADAPTERS)
    # A temp dir of its own (short: Unix socket paths): no other Ray on this machine
    # sees this cluster as "the current one", nor this one theirs.
    temp_dir = tempfile.mkdtemp(prefix="lsrc", dir="/tmp")
    node_args: dict[str, Any] = {
        "num_cpus": 1,
        "object_store_memory": 96 << 20,
        "temp_dir": temp_dir,
    }
    ray_cluster = RayCluster(
        initialize_head=True,
        head_node_args={**node_args, "resources": {"node-a": 1}, "include_dashboard": False},
    )
    ray_cluster.add_node(**node_args, resources={"node-b": 1})
    nodes = [ray_cluster.head_node, *ray_cluster.worker_nodes]
    raylets = {
        n.all_processes["raylet"][0].process.pid: name
        for n, name in zip(nodes, ("node-a", "node-b"), strict=True)
    }
    ours = {p.pid for pid in raylets for p in [psutil.Process(pid)]}
    ours |= {p.pid for n in nodes for ps in n.all_processes.values() for p in [ps[0].process]}
    env = {
        "LORASWAP_REGISTRY__REFRESH_INTERVAL_S": str(REFRESH_S),
        "LORASWAP_RAY__BEAT_INTERVAL_S": "1",
        "LORASWAP_RAY__REPLICA_TTL_S": "5",
    }
    args = ["--ray-address", ray_cluster.address, "--replicas", "2"]
    args += ["--max-replicas-per-node", "1", "--adapters-per-replica", "2"]
    try:
        with running_ray_server(demo, state, args, env, adapters) as proc:
            record_result("ray_cluster_start_to_healthy_s_2_nodes", round(proc.start_seconds, 1))
            yield Cluster(proc, raylets, ray_cluster)
    finally:
        everything = [c for pid in raylets if psutil.pid_exists(pid) for c in _tree(pid)] + [
            psutil.Process(p) for p in ours if psutil.pid_exists(p)
        ]
        ray_cluster.shutdown()  # type: ignore[no-untyped-call]
        assert_all_gone(everything)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


# Short answers: these tests count requests and replicas, not words.
chat = functools.partial(ray_support.chat, max_tokens=4)


def test_one_replica_per_node_and_chat_through_both(cluster: Cluster) -> None:
    procs = cluster.replica_procs()
    assert sorted(procs) == ["node-a", "node-b"], procs  # one Replica under each raylet
    with httpx.Client(base_url=cluster.server.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json=chat(f"{BASE}:c0", "Hello there", max_tokens=16))
        assert r.status_code == 200, r.text
        for name in ADAPTERS:  # registers the folders
            assert c.post("/v1/chat/completions", json=chat(f"{BASE}:{name}")).status_code == 200
    time.sleep(2 * REFRESH_S + 0.5)
    rng = random.Random(3)
    models = [f"{BASE}:{m}" for m in rng.choices(ADAPTERS, weights=[8, 4, 2, 1], k=60)]
    responses = asyncio.run(post_chats(cluster.server.url, models))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses[:3]]
    warm = sum(r.headers["x-loraswap-cold-load"] == "0" for r in responses) / len(responses)
    per_replica: dict[str, int] = {}
    for r in responses:
        per_replica[r.headers["x-loraswap-replica"]] = (
            per_replica.get(r.headers["x-loraswap-replica"], 0) + 1
        )
    result = {"requests": len(responses), "warm_share": round(warm, 3), "per_replica": per_replica}
    print("ray cluster affinity:", json.dumps(result))
    record_result("ray_cluster_affinity", result)
    assert len(per_replica) == 2  # both nodes served
    assert warm > 0.5


async def _open_stream(
    c: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]
) -> tuple[Any, httpx.Response]:
    cm = c.stream("POST", "/v1/chat/completions", json=body, headers=headers)
    response = await cm.__aenter__()
    return cm, response


def test_a_tenant_quota_holds_across_both_replicas(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.server.url, timeout=60, headers=AUTH) as c:
        r = c.put("/admin/tenants/q", json={"max_concurrent": 2})
        assert r.status_code == 200, r.text
        key = c.post("/admin/tenants/q/keys").json()["key"]
    time.sleep(2 * REFRESH_S + 0.5)
    auth = {"authorization": f"Bearer {key}"}
    long = chat(BASE, "Tell me a long story.", max_tokens=400, stream=True, ignore_eos=True)

    async def run() -> tuple[list[str], int, str, int, int]:
        async with httpx.AsyncClient(base_url=cluster.server.url, timeout=120) as c:
            opened = []
            for _ in range(2):
                opened.append(await _open_stream(c, long, auth))
                await asyncio.sleep(0.5)
            replicas = [resp.headers.get("x-loraswap-replica", "?") for _, resp in opened]
            statuses = [resp.status_code for _, resp in opened]
            assert statuses == [200, 200], statuses
            third = await c.post("/v1/chat/completions", json=chat(BASE), headers=auth)
            admin = await c.get("/admin/tenants/q", headers=AUTH)
            running = admin.json()["running"]
            for cm, _ in opened:
                await cm.__aexit__(None, None, None)
            await asyncio.sleep(1.0)  # the aborted streams' releases reach the coordinator
            after = await c.post("/v1/chat/completions", json=chat(BASE), headers=auth)
            return replicas, third.status_code, third.text, running, after.status_code

    replicas, third, text, running, after = asyncio.run(run())
    record_result("ray_cluster_quota", {"replicas": replicas, "third": third, "running": running})
    assert len(set(replicas)) == 2, replicas  # one stream on each replica
    assert third == 429, text
    assert json.loads(text)["error"]["code"] == "rate_limit_exceeded"
    assert running == 2  # the application's count, whichever replica answered
    assert after == 200


def test_metrics_at_the_ingress_show_both_replicas(cluster: Cluster) -> None:
    time.sleep(2.5)  # a beat of each replica
    with httpx.Client(base_url=cluster.server.url, timeout=60) as c:
        assert c.get("/metrics").status_code in (401, 403)
        r = c.get("/metrics", headers=AUTH)
    assert r.status_code == 200, r.text
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    requests = families["loraswap_requests"]
    replicas = {s.labels["replica"] for s in requests.samples}
    assert replicas == {"replica-0", "replica-1"}, replicas


def test_a_replica_killed_mid_stream(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.server.url, timeout=60, headers=AUTH) as c:
        registered = sorted(a["name"] for a in c.get("/admin/adapters").json()["data"])
    victim = cluster.replica_procs()["node-b"]
    engine_procs = victim.children(recursive=True)  # its vLLM engine core
    long = chat(BASE, "Tell me a long story.", max_tokens=400, stream=True, ignore_eos=True)

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=cluster.server.url, timeout=120) as c:
            opened = []
            for _ in range(2):  # one on each replica (the second goes to the idle one)
                opened.append(await _open_stream(c, long, AUTH))
                await asyncio.sleep(0.5)
            assert [resp.status_code for _, resp in opened] == [200, 200]
            await asyncio.sleep(1.0)  # both streams under way
            killed = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)

            async def ending(cm: Any, resp: httpx.Response) -> list[str]:
                lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
                await cm.__aexit__(None, None, None)
                return lines[-2:]

            async def first_success() -> tuple[float | None, int]:
                failed = 0
                while time.monotonic() - killed < 120:
                    r = await c.post("/v1/chat/completions", json=chat(BASE), headers=AUTH)
                    if r.status_code == 200:
                        return time.monotonic() - killed, failed
                    failed += 1
                    await asyncio.sleep(0.2)
                return None, failed

            *endings, (success, failed) = await asyncio.gather(
                *(ending(cm, resp) for cm, resp in opened), first_success()
            )
            # then: every request succeeds while the replica comes back
            later = [
                (await c.post("/v1/chat/completions", json=chat(BASE), headers=AUTH)).status_code
                for _ in range(5)
            ]
            back = None
            while back is None and time.monotonic() - killed < 400:
                await asyncio.sleep(2.0)
                new = cluster.replica_procs().get("node-b")
                if new is None or new.pid == victim.pid:
                    continue
                served = set()
                for _ in range(6):  # Ray's routing sends these to RUNNING replicas only
                    r = await c.post(
                        "/v1/chat/completions", json=chat(BASE), headers={**AUTH, **ANY}
                    )
                    later.append(r.status_code)
                    served.add(r.headers.get("x-loraswap-replica"))
                if len(served) == 2:
                    back = time.monotonic() - killed
            return {
                "endings": endings,
                "first_success_after_kill_s": None if success is None else round(float(success), 2),
                "failed_before_first_success": failed,
                "later_statuses": later,
                "replica_back_after_kill_s": None if back is None else round(back, 1),
            }

    result = asyncio.run(run())
    print("ray cluster failover:", json.dumps(result))
    record_result("ray_cluster_failover", result)
    errors = [e for e in result["endings"] if '"error"' in e[0]]
    assert len(errors) == 1, result["endings"]  # the killed replica's stream
    assert '"code": "engine_unavailable"' in errors[0][0] and errors[0][1] == "data: [DONE]"
    assert result["first_success_after_kill_s"] is not None
    assert set(result["later_statuses"]) == {200}, result["later_statuses"]
    assert result["replica_back_after_kill_s"] is not None, "Ray did not bring the replica back"
    with httpx.Client(base_url=cluster.server.url, timeout=60, headers=AUTH) as c:
        after = sorted(a["name"] for a in c.get("/admin/adapters").json()["data"])
    assert after == registered
    _, alive = psutil.wait_procs(engine_procs, timeout=30)
    assert not alive, f"the killed replica's engine is still running: {alive}"
