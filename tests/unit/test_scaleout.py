"""Scale-out without Ray (server/scaleout/): quotas for the whole application across two
replicas (the real app on the fake engine, sharing one Coordinator in-process, as Ray
replicas share its actor), the coordinator's expiry of a dead replica's tickets, failing
closed when it is unreachable, the builder's args -> Settings, the `serve` config file,
the replicas' Ray options, and the metrics merge."""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client.parser import text_string_to_metric_families

from adapters_registry.records import TenantRecord
from server.app import create_app
from server.errors import RateLimited
from server.scaleout.config import settings_from_args
from server.scaleout.coordinator import (
    Coordinator,
    Grant,
    Refusal,
    SharedQuotas,
    Snapshot,
    unreachable,
)
from server.scaleout.ingress import Gate, forward
from server.scaleout.metrics_merge import merge
from server.scaleout.placement import HttpRequest, ResponseStart
from server.settings import Settings
from tests.adapters import make_base
from tests.fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


class LocalCalls:
    """CoordinatorCalls in-process: what the Ray actor's handle does, minus the wire."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.down = False

    def _up(self) -> None:
        if self.down:
            raise unreachable()

    async def admit(
        self, owner: str, tenant: TenantRecord | None, estimate: int
    ) -> Grant | Refusal:
        self._up()
        return self.coordinator.admit(owner, tenant, estimate)

    def reserve(self, number: int, total: int) -> Refusal | None:
        self._up()
        return self.coordinator.reserve(number, total)

    def release(self, number: int, used_tokens: int | None) -> None:
        if not self.down:
            self.coordinator.release(number, used_tokens)

    async def snapshot(self) -> Snapshot:
        self._up()
        return self.coordinator.snapshot()


class GatedEngine(FakeEngine):
    """Requests wait at the gate once they reach the engine: they stay running."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.arrived = 0

    async def on_generate(self, request_id: str) -> None:
        self.arrived += 1
        await self.gate.wait()


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    if not (tmp_path / "base").exists():
        make_base(tmp_path / "base")
    return Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        home=tmp_path / "home",
        admin_key=ADMIN_KEY,
        **extra,
    )


def _chat(max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }


async def _until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a_tenant_quota_holds_across_replicas(tmp_path: Path) -> None:
    coordinator = Coordinator(max_in_flight=3, ttl_s=60)
    calls = LocalCalls(coordinator)
    settings = _settings(tmp_path)
    engines = [GatedEngine(), GatedEngine()]
    apps = [
        create_app(settings, engine=e, quotas=SharedQuotas(calls, f"owner-{i}"))
        for i, e in enumerate(engines)
    ]
    async with (
        apps[0].router.lifespan_context(apps[0]),
        apps[1].router.lifespan_context(apps[1]),
    ):
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://r")
            for a in apps
        ]
        c0, c1 = clients
        assert (
            await c0.put("/admin/tenants/t", headers=ADMIN, json={"max_concurrent": 2})
        ).is_success
        key = (await c0.post("/admin/tenants/t/keys", headers=ADMIN)).json()["key"]
        apps[1].state.router.registry.refresh()
        auth = {"authorization": f"Bearer {key}"}
        first = asyncio.create_task(c0.post("/v1/chat/completions", json=_chat(), headers=auth))
        second = asyncio.create_task(c1.post("/v1/chat/completions", json=_chat(), headers=auth))
        await _until(lambda: engines[0].arrived == 1 and engines[1].arrived == 1)
        for c in clients:  # the third, whichever replica it reaches (never admitted)
            third_try = c.post("/v1/chat/completions", json=_chat(), headers=auth)
            r = await asyncio.wait_for(third_try, 10)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # the admin API counts the application's running requests, whichever replica answers
        assert apps[1].state.quotas.tenant_in_flight("t") == 0  # not synced yet
        await apps[1].state.quotas.sync()
        assert apps[1].state.quotas.tenant_in_flight("t") == 2
        # max_in_flight is the application's too: 2 running + 1 without a tenant = 3
        third = asyncio.create_task(c1.post("/v1/chat/completions", json=_chat(), headers=ADMIN))
        await _until(lambda: engines[1].arrived == 2)
        r = await c0.post("/v1/chat/completions", json=_chat(), headers=ADMIN)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "server_overloaded")
        for e in engines:
            e.gate.set()
        assert [(await t).status_code for t in (first, second, third)] == [200, 200, 200]
        assert coordinator.quotas.in_flight == 0
        assert coordinator.quotas.tenant_in_flight("t") == 0
        r = await c1.post("/v1/chat/completions", json=_chat(), headers=auth)
        assert r.status_code == 200, r.text
        for c in clients:
            await c.aclose()


async def test_token_budget_is_shared_and_refunded(tmp_path: Path) -> None:
    coordinator = Coordinator(max_in_flight=10, ttl_s=60)
    calls = LocalCalls(coordinator)
    settings = _settings(tmp_path)
    apps = [
        create_app(settings, engine=FakeEngine(), quotas=SharedQuotas(calls, f"o{i}"))
        for i in range(2)
    ]
    async with (
        apps[0].router.lifespan_context(apps[0]),
        apps[1].router.lifespan_context(apps[1]),
    ):
        c0, c1 = (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://r")
            for a in apps
        )
        body = {"tokens_per_minute": 100}
        assert (await c0.put("/admin/tenants/t", headers=ADMIN, json=body)).is_success
        key = (await c0.post("/admin/tenants/t/keys", headers=ADMIN)).json()["key"]
        apps[1].state.router.registry.refresh()
        auth = {"authorization": f"Bearer {key}"}
        # prompt (~30 tokens with the template) + 60 reserved: fits once, not twice
        r = await c0.post("/v1/chat/completions", json=_chat(60), headers=auth)
        assert r.status_code == 200, r.text
        used = r.json()["usage"]["total_tokens"]
        left = coordinator.quotas._buckets["t"].tokens
        assert 100 - used - 1 <= left <= 100 - used + 1  # the unused part came back
        r = await c1.post("/v1/chat/completions", json=_chat(60), headers=auth)
        assert r.status_code == 429, r.text  # the other replica sees the same bucket
        await c0.aclose()
        await c1.aclose()


def test_a_dead_replicas_tickets_expire() -> None:
    now = [0.0]
    c = Coordinator(max_in_flight=10, ttl_s=15, clock=lambda: now[0])
    t = TenantRecord(name="t", max_concurrent=1, tokens_per_minute=None, created_at=0)
    grant = c.admit("dead", t, 0)
    assert isinstance(grant, Grant)
    refused = c.admit("live", t, 0)
    assert isinstance(refused, Refusal) and refused.kind == "RateLimited"
    with pytest.raises(RateLimited):
        refused.throw()
    c.beat("live", "replica-1", b"")
    now[0] = 10.0
    c.beat("live", "replica-1", b"x 1\n")
    now[0] = 16.0  # "dead" silent for 16 s > 15: its ticket is freed; "live" beat at 10
    assert isinstance(c.admit("live", t, 0), Grant)
    assert c.snapshot().metrics == {"replica-1": b"x 1\n"}
    c.release(grant.ticket, None)  # a late release of an expired ticket changes nothing
    assert c.quotas.tenant_in_flight("t") == 1


async def test_unreachable_coordinator_fails_closed(tmp_path: Path) -> None:
    calls = LocalCalls(Coordinator(max_in_flight=10, ttl_s=60))
    app = create_app(_settings(tmp_path), engine=FakeEngine(), quotas=SharedQuotas(calls, "o"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
            calls.down = True
            r = await c.post("/v1/chat/completions", json=_chat(), headers=ADMIN)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "quotas_unavailable"
            assert r.headers["retry-after"] == "1"
            calls.down = False
            r = await c.post("/v1/chat/completions", json=_chat(), headers=ADMIN)
            assert r.status_code == 200, r.text


def test_builder_args_become_the_one_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASWAP_ENGINE__KV_CACHE_GIB", "3")
    monkeypatch.setenv("LORASWAP_RAY__REPLICAS", "5")
    s = settings_from_args(
        {
            "model": "/m",
            "engine.max_loras": "2",
            "ray__max_replicas": "4",
            "ray": {"min_replicas": 1},
        }
    )
    assert s.model == Path("/m")
    assert (s.engine.kv_cache_gib, s.engine.max_loras) == (3, 2)  # env, then args
    assert (s.ray.replicas, s.ray.min_replicas, s.ray.max_replicas) == (5, 1, 4)
    assert s.ray.autoscaling
    with pytest.raises(ValueError, match=r"unknown setting 'engine\.max_lora'"):
        settings_from_args({"engine.max_lora": "2"})
    with pytest.raises(ValueError, match="min_replicas"):
        settings_from_args({"ray.min_replicas": 3, "ray.max_replicas": 2})


def test_serve_config_file_parses_and_builds_its_settings() -> None:
    from ray.serve.schema import ServeDeploySchema

    from server.scaleout import ray_serve

    config = yaml.safe_load((ROOT / "deploy/ray/serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    assert (module, getattr(ray_serve, name)) == (
        "server.scaleout.ray_serve",
        ray_serve.app_builder,
    )
    settings = settings_from_args(app.args)
    options = ray_serve.replica_options(settings)
    assert options["max_replicas_per_node"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in options
    assert set(app.runtime_env["env_vars"]) >= {"LORASWAP_REGISTRY__DATABASE_URL"}


@pytest.mark.parametrize("module", ["ray_serve", "placement", "ingress"])
def test_the_old_import_paths_still_work_and_say_where_the_module_went(module: str) -> None:
    # Deployment files written before the move name `server.ray_serve:app_builder`.
    old = importlib.import_module(f"server.{module}")
    new = importlib.import_module(f"server.scaleout.{module}")
    public = [n for n in vars(new) if not n.startswith("_")]
    for name in public:
        with pytest.deprecated_call(match=rf"server\.scaleout\.{module}; import {name}"):
            assert getattr(old, name) is getattr(new, name)
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018
    assert not hasattr(old, "__all__")


def test_ray_finds_the_app_builder_at_its_old_path() -> None:
    from ray._common.utils import import_attr

    from server.scaleout.ray_serve import app_builder

    with pytest.deprecated_call():
        assert import_attr("server.ray_serve:app_builder") is app_builder


def test_replica_options_count_gpus_and_core_split() -> None:
    from server.scaleout import ray_serve

    fixed = Settings(ray={"replicas": 3})
    options = ray_serve.replica_options(fixed)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert "num_gpus" not in options["ray_actor_options"]  # a CPU build of vLLM here
    gpu = Settings(engine={"tensor_parallel_size": 2}, ray={"gpus_per_replica": 2})
    assert ray_serve.replica_options(gpu)["ray_actor_options"]["num_gpus"] == 2
    # one machine: 3 replicas split the cores; one per node: each binds all of them
    assert ray_serve.replicas_per_node(fixed) == 3
    assert [ray_serve.cpus_of_replica(r, 2, 8) for r in range(3)] == ["0-3", "4-7", "0-3"]
    one = Settings(ray={"max_replicas": 4, "max_replicas_per_node": 1})
    assert ray_serve.replicas_per_node(one) == 1
    assert ray_serve.cpus_of_replica(3, 1, 8) == "0-7"


def test_the_deployments_keep_their_names_and_options_and_ray_sees_the_multiplexer() -> None:
    from ray.serve._private.utils import _callable_uses_multiplexing

    from server.scaleout import ray_serve

    settings = Settings(ray={"replicas": 3, "adapters_per_replica": 5})
    replica = ray_serve.replica_deployment(settings)
    ingress = ray_serve.ingress_deployment(settings)
    # the names Ray's processes and logs carry (ServeReplica:loraswap:Replica)
    assert (replica.name, ingress.name) == ("Replica", "Ingress")
    assert (replica.num_replicas, replica.max_ongoing_requests) == (3, settings.engine.max_num_seqs)
    assert ingress.max_ongoing_requests == settings.max_in_flight
    assert issubclass(replica.func_or_class, ray_serve.Replica)
    assert issubclass(ingress.func_or_class, ray_serve.Ingress)
    # routing by multiplexed model id needs Ray to see @serve.multiplexed on the class
    assert _callable_uses_multiplexing(replica.func_or_class)
    assert ray_serve.adapters_per_replica(settings) == 5
    assert ray_serve.adapters_per_replica(Settings(engine={"max_cpu_loras": 7})) == 7


def test_each_replica_binds_its_engine_to_its_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.scaleout import ray_serve

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    two = Settings(ray={"replicas": 2})
    bound = [ray_serve.replica_settings(two, rank).engine.cpu_threads_bind for rank in (0, 1)]
    assert bound == ["0-3", "4-7"]
    assert two.engine.cpu_threads_bind == "auto"  # the application's own stay as they were
    fixed = Settings(engine={"cpu_threads_bind": "0-1"}, ray={"replicas": 2})
    assert ray_serve.replica_settings(fixed, 1) is fixed


def test_metrics_merge_labels_every_series_with_its_replica() -> None:
    from server.metrics import Metrics

    texts = {}
    for i, n in enumerate((3, 5)):
        m = Metrics()
        m.in_flight.set(n)
        texts[f"replica-{i}"] = m.render(max_lora=2, running_adapters=["a"])
    merged = merge(texts).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    samples = [s for s in families["loraswap_requests_in_flight"].samples]
    assert {(s.labels["replica"], s.value) for s in samples} == {("replica-0", 3), ("replica-1", 5)}
    assert merged.count("# TYPE loraswap_requests_in_flight gauge") == 1
    # every series of every replica, none lost, none merged into another
    total = sum(len(list(text_string_to_metric_families(t.decode()))) for t in texts.values())
    assert total == 2 * len(families)
    assert merge({}) == b""


async def _frames(chunks: list[bytes], fail: bool) -> AsyncIterator[Any]:
    yield ResponseStart(200, [(b"content-type", b"text/event-stream; charset=utf-8")])
    for c in chunks:
        yield c
    if fail:
        raise ConnectionError("replica died")  # what Ray raises is an ActorDiedError


async def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_frame(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    app = create_app(settings, engine=FakeEngine())
    async with app.router.lifespan_context(app):
        gate = Gate(settings, app.state.router.registry)
        edge = FastAPI()

        def call(request: HttpRequest, key: str | None) -> AsyncIterator[Any]:
            return _frames([b'data: {"a": 1}\n\n'], fail=True)

        @edge.post("/{path:path}")
        async def route(request: Request) -> Response:
            return await forward(gate, request, call)

        transport = httpx.ASGITransport(app=edge)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as c:
            r = await c.post("/v1/chat/completions", json=_chat(), headers=ADMIN)
        assert r.status_code == 200
        frames = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert frames[0] == 'data: {"a": 1}'
        assert '"code": "engine_unavailable"' in frames[1]
        assert frames[-1] == "data: [DONE]"


def test_the_cluster_address_is_the_setting_else_rays_own_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.scaleout.ray_serve import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(Settings()) is None  # a local Ray of our own
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert ray_address(Settings()) == "head:6379"
    assert ray_address(Settings(ray={"address": "ray://x:10001"})) == "ray://x:10001"
