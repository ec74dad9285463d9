"""Ray Serve deployment: N replicas, each with its own engine, and adapter affinity.

The only module importing ray. `loraswap serve --ray` runs, on a Ray it starts or on a
cluster it joins (`--ray-address`, `RAY_ADDRESS`), and Ray's own tooling runs the same
application (`serve run server.scaleout.ray_serve:app_builder ...`, a `serve` config file
with `import_path: server.scaleout.ray_serve:app_builder`, a KubeRay RayService):

    HTTP -> Ray Serve proxy -> Ingress (1) -> Replica (N, or autoscaled), each create_app
                                                  \\-> Coordinator (1 named actor)

- **Ingress** first admits the request (ingress.py: body limits, the upload limit
  only for the admin on the upload routes, authentication and tenant access of inference
  calls: nothing is routed or loaded for a caller that may not use the model), then
  resolves `model` (+ the A/B user) to the concrete `<adapter>@<version>` with
  the shared registry (placement.py: routing_key) and calls a replica with that as
  Ray Serve's multiplexed model id: Ray routes it to a replica that already holds it
  (`@serve.multiplexed`), else to the least loaded one, which loads it. Everything else
  (admin API, /v1/models, base-model requests) goes to any replica. The request itself
  crosses as bytes and the response comes back as a stream (SSE stays SSE). A replica
  that dies mid-stream ends the stream with an error frame; Ray restarts it, and new
  requests go to the live ones (multiplexed ids of a dead replica are forgotten).
- **Replica** runs the whole single-process app (auth, metrics, errors) in-process
  on the request, with its own vLLM engine; it keeps at most `adapters_per_replica`
  versions in its engine (placement.py: Residency, LRU), the same number Ray's
  multiplexer assumes, and says in `x-loraswap-replica` / `x-loraswap-cold-load` which
  replica served the request and whether it had to load the adapter.
- **Coordinator** (coordinator.py): the application's one quota state
  (tenant concurrency and tokens, `max_in_flight`), which every replica's Gateway admits
  against, and the board where replicas publish their metrics: `/metrics`, whichever
  replica answers it, merges them (metrics_merge.py).
- **Admin changes** go through one replica to the shared registry database; the others,
  and the ingress, poll it every `registry.refresh_interval_s`: every replica serves the
  new state at most `refresh_interval_s` (plus one poll's duration) after the write is
  acknowledged. Admin calls themselves read the database first, whichever replica
  answers them: an admin call sees every acknowledged admin write.

`x-loraswap-routing: any` on a request skips the affinity (Ray's default routing): for
comparisons only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from adapters_registry.records import TenantRecord
from server.app import create_app, follow_registry, open_registry
from server.errors import EngineUnavailable, QuotasUnavailable
from server.scaleout import ingress
from server.scaleout.config import settings_from_args
from server.scaleout.coordinator import (
    Coordinator,
    Grant,
    Refusal,
    SharedQuotas,
    Snapshot,
    unreachable,
)
from server.scaleout.metrics_merge import merge
from server.scaleout.placement import (
    HttpRequest,
    Residency,
    ResponseStart,
    call_asgi,
    collect,
    parse_key,
)
from server.settings import Settings

log = logging.getLogger("loraswap.ray")

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
APP_NAME = "loraswap"
_NAMESPACE = "loraswap"


def cpus_of_replica(rank: int, replicas: int, cores: int) -> str:
    """The cores replica `rank` binds its engine's threads to: the cores split evenly
    (two engines spinning on the same cores would halve each other's speed)."""
    rank %= replicas
    if replicas >= cores:
        core = rank % cores
        return f"{core}"
    per = cores // replicas
    return f"{rank * per}-{rank * per + per - 1}"


def replicas_per_node(settings: Settings) -> int:
    """How many replicas may share a node, i.e. split its cores: `max_replicas_per_node`
    (1: each replica binds all of its node's cores), else all of them (one machine)."""
    r = settings.ray
    count = r.max_replicas if r.max_replicas is not None else r.replicas
    return min(r.max_replicas_per_node or count, count)


def gpus_per_replica(settings: Settings) -> float:
    if settings.ray.gpus_per_replica is not None:
        return settings.ray.gpus_per_replica
    from server.engine.vllm import gpu_build

    return float(settings.engine.tensor_parallel_size) if gpu_build() else 0.0


def adapters_per_replica(settings: Settings) -> int:
    """How many adapter versions one replica keeps in its engine: its residency, and the
    capacity Ray's multiplexer is told, so that the two agree on what a replica holds."""
    return settings.ray.adapters_per_replica or settings.engine.max_cpu_loras


def replica_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve's options of the Replica deployment: count or autoscaling, placement."""
    actor: dict[str, Any] = {"num_cpus": 0}
    gpus = gpus_per_replica(settings)
    if gpus:
        actor["num_gpus"] = gpus
    return {
        "max_ongoing_requests": settings.engine.max_num_seqs,
        "ray_actor_options": actor,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "health_check_period_s": 5,
        "max_replicas_per_node": settings.ray.max_replicas_per_node,
        **_replica_count(settings),
    }


def _replica_count(settings: Settings) -> dict[str, Any]:
    """A fixed number of replicas, or the autoscaler's bounds and targets."""
    r = settings.ray
    if not r.autoscaling:
        return {"num_replicas": r.replicas}
    return {
        "autoscaling_config": {
            "min_replicas": r.min_replicas if r.min_replicas is not None else 1,
            "max_replicas": r.max_replicas,
            "target_ongoing_requests": r.target_ongoing_requests,
            "upscale_delay_s": r.upscale_delay_s,
            "downscale_delay_s": r.downscale_delay_s,
        }
    }


def replica_settings(settings: Settings, rank: int) -> Settings:
    """The settings replica `rank` runs with: with `engine.cpu_threads_bind` "auto", its
    engine's threads bound to its share of the node's cores (cpus_of_replica)."""
    if settings.engine.cpu_threads_bind != "auto":
        return settings
    cores = len(os.sched_getaffinity(0))
    bind = cpus_of_replica(rank, replicas_per_node(settings), cores)
    engine = settings.engine.model_copy(update={"cpu_threads_bind": bind})
    return settings.model_copy(update={"engine": engine})


@ray.remote(num_cpus=0, max_restarts=-1)
class CoordinatorActor:
    """The Coordinator in one Ray actor: its methods run one at a time, in order."""

    def __init__(self, max_in_flight: int, ttl_s: float) -> None:
        self._c = Coordinator(max_in_flight, ttl_s)

    def configure(self, max_in_flight: int) -> None:
        self._c.configure(max_in_flight)

    def admit(self, owner: str, tenant: TenantRecord | None, estimate: int) -> Grant | Refusal:
        return self._c.admit(owner, tenant, estimate)

    def reserve(self, number: int, total: int) -> Refusal | None:
        return self._c.reserve(number, total)

    def release(self, number: int, used_tokens: int | None) -> None:
        self._c.release(number, used_tokens)

    def beat(self, owner: str, name: str, metrics: bytes | None) -> None:
        self._c.beat(owner, name, metrics)

    def snapshot(self) -> Snapshot:
        return self._c.snapshot()


def coordinator_name(app_name: str) -> str:
    return f"{APP_NAME}-coordinator-{app_name}"


def coordinator(settings: Settings, app_name: str) -> Any:
    """The application's coordinator: created by the first replica that asks, then
    found by name. Detached, so that replicas restarting do not take it with them;
    restarted by Ray if its process or node dies (with fresh counts)."""
    return CoordinatorActor.options(  # type: ignore[attr-defined]
        name=coordinator_name(app_name),
        namespace=_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(settings.max_in_flight, settings.ray.replica_ttl_s)


class _RayCalls:
    """server/scaleout/coordinator.py's CoordinatorCalls over the actor; any failure to
    reach it within the timeout is QuotasUnavailable (fail closed)."""

    def __init__(self, actor: Any, timeout_s: float) -> None:
        self._actor = actor
        self._timeout_s = timeout_s

    async def admit(
        self, owner: str, tenant: TenantRecord | None, estimate: int
    ) -> Grant | Refusal:
        result: Grant | Refusal = await self._call(
            self._actor.admit.remote(owner, tenant, estimate)
        )
        return result

    def reserve(self, number: int, total: int) -> Refusal | None:
        try:
            result: Refusal | None = ray.get(
                self._actor.reserve.remote(number, total), timeout=self._timeout_s
            )
        except Exception as exc:
            raise _unreachable(exc) from exc
        return result

    def release(self, number: int, used_tokens: int | None) -> None:
        with contextlib.suppress(Exception):
            self._actor.release.remote(number, used_tokens)

    async def snapshot(self) -> Snapshot:
        result: Snapshot = await self._call(self._actor.snapshot.remote())
        return result

    async def _call(self, ref: Any) -> Any:
        try:
            return await asyncio.wait_for(ref, self._timeout_s)
        except Exception as exc:
            raise _unreachable(exc) from exc


def _unreachable(exc: Exception) -> QuotasUnavailable:
    log.warning("quota coordinator unreachable: %r", exc)
    return unreachable()


def build_app(settings: Settings) -> Any:
    """The Ray Serve application: the Ingress deployment bound to the Replica one."""
    replica = replica_deployment(settings).bind(settings)
    return ingress_deployment(settings).bind(replica, settings)


# Ray Serve takes some of an application's settings in decorators, i.e. when a class is
# made: each deployment below is a subclass per application that adds the one decorated
# method, of a module-level class that does the work.


def replica_deployment(settings: Settings) -> Any:
    """Replica as a Ray Serve deployment with `settings`' options, its multiplexer told
    the replica's capacity."""
    capacity = adapters_per_replica(settings)

    class MultiplexedReplica(Replica):
        @serve.multiplexed(max_num_models_per_replica=capacity)  # type: ignore[untyped-decorator]
        async def _multiplexed(self, key: str) -> str:
            # Tells Ray this replica holds `key`; the engine side is _place's.
            return key

    return serve.deployment(name="Replica", **replica_options(settings))(MultiplexedReplica)


def ingress_deployment(settings: Settings) -> Any:
    """Ingress as a Ray Serve deployment: every path and method to Ingress.forward."""
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    class RoutedIngress(Ingress):
        @api.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
        async def route(self, request: Request) -> Response:
            return await self.forward(request)

    return serve.deployment(
        name="Ingress",
        max_ongoing_requests=settings.max_in_flight,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
    )(serve.ingress(api)(RoutedIngress))


class Replica:
    """One replica: the whole single-process app on its own engine, the adapter versions
    it holds (LRU), its quota tickets and metrics at the coordinator."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        context = serve.get_replica_context()
        settings = replica_settings(settings, context.rank.rank)
        self._name = f"replica-{context.rank.rank}"
        self._owner = context.replica_id.unique_id
        self._coordinator = coordinator(settings, context.app_name)
        self._coordinator.configure.remote(settings.max_in_flight)
        calls = _RayCalls(self._coordinator, settings.ray.coordinator_timeout_s)
        self._quotas = SharedQuotas(calls, self._owner)
        self._metrics_auth = _metrics_auth(settings)
        self._app = create_app(settings, quotas=self._quotas)
        self._lifespan: Any = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()
        self._router = self._app.state.router
        self._residency = Residency(adapters_per_replica(settings))
        self._lock = asyncio.Lock()
        self._beats = asyncio.create_task(self._beat(settings.ray.beat_interval_s))

    # Ray's record of the versions this replica holds (@serve.multiplexed, with the
    # application's capacity): added by replica_deployment.
    _multiplexed: Callable[[str], Awaitable[str]]

    async def handle(
        self, request: HttpRequest, key: str | None
    ) -> AsyncIterator[ResponseStart | bytes]:
        headers = [(b"x-loraswap-replica", self._name.encode())]
        if request.path.startswith("/admin"):
            await self._read_your_writes()
        if request.path == "/metrics":
            async for item in self._metrics(request, headers):
                yield item
            return
        if key is not None:
            if serve.get_multiplexed_model_id():
                await self._multiplexed(key)
            hit = await self._place(key)
            headers.append((b"x-loraswap-cold-load", b"0" if hit else b"1"))
        async for item in call_asgi(self._app, request, headers):
            yield item

    async def _read_your_writes(self) -> None:
        """Before an admin call: the registry's latest state, since an admin call right
        after another one, answered by another replica, must see it (one single-row
        read when nothing changed); tenants' running requests as the whole application
        counts them."""
        if await asyncio.to_thread(self._router.registry.refresh):
            await self._router.release_unreachable()
        with contextlib.suppress(QuotasUnavailable):
            await self._quotas.sync()

    async def _place(self, key: str) -> bool:
        """Make `key` resident (LRU beyond capacity); True if it already was."""
        async with self._lock:
            hit, evicted = self._residency.touch(key)
            for old in evicted:
                await self._router.unload(*parse_key(old))
        if not hit:
            try:
                await self._router.load(*parse_key(key))
            except Exception:  # gone meanwhile: the request itself reports it
                log.info("could not load %s", key, exc_info=True)
        return hit

    async def _metrics(
        self, request: HttpRequest, headers: list[tuple[bytes, bytes]]
    ) -> AsyncIterator[ResponseStart | bytes]:
        """The app's /metrics (its own auth decides), answered for the application:
        this replica's series now, the others' as last published, each labelled."""
        start, body = await collect(call_asgi(self._app, request, headers))
        if start.status == 200:
            others: dict[str, bytes] = {}
            with contextlib.suppress(QuotasUnavailable):
                others = (await self._quotas.sync()).metrics
            body = merge({**others, self._name: body})
            start.headers = [(k, v) for k, v in start.headers if k != b"content-length"]
        yield start
        yield body

    async def _beat(self, interval_s: float) -> None:
        """Renew this replica's quota tickets and publish its metrics."""
        while True:
            try:
                metrics = await self._own_metrics()
                await asyncio.wait_for(
                    self._coordinator.beat.remote(self._owner, self._name, metrics),
                    interval_s * 2,
                )
            except Exception:
                log.warning("beat to the coordinator failed", exc_info=True)
            await asyncio.sleep(interval_s)

    async def _own_metrics(self) -> bytes | None:
        request = HttpRequest("GET", "/metrics", headers=self._metrics_auth)
        request.client = ("127.0.0.1", 0)  # open mode's local caller, if no key is set
        start, body = await collect(call_asgi(self._app, request))
        return body if start.status == 200 else None

    async def __del__(self) -> None:
        beats = getattr(self, "_beats", None)
        if beats is not None:
            beats.cancel()
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            self._lifespan = None
            await lifespan.__aexit__(None, None, None)


class Ingress:
    """The application's HTTP entry: admission and routing (ingress.py), then the call
    to a replica, with the routing key as Ray's multiplexed model id."""

    async def __init__(self, replica: Any, settings: Settings) -> None:  # type: ignore[misc]
        self._replica = replica
        self._registry, _ = open_registry(settings)
        self._gate = ingress.Gate(settings, self._registry)
        self._ready = False
        self._poll: asyncio.Task[None] | None = None
        if settings.registry.refresh_interval_s > 0:
            self._poll = asyncio.create_task(
                follow_registry(self._registry, settings.registry.refresh_interval_s)
            )

    def set_ready(self) -> None:
        self._ready = True

    async def forward(self, request: Request) -> Response:
        if not self._ready and request.url.path == "/health":
            return _unavailable("starting")
        return await ingress.forward(self._gate, request, self._call)

    async def _call(
        self, request: HttpRequest, key: str | None
    ) -> AsyncIterator[ResponseStart | bytes]:
        handle = self._replica.options(stream=True)
        if key is not None and _header(request, b"x-loraswap-routing") != b"any":
            handle = handle.options(multiplexed_model_id=key)
        stream = handle.handle.remote(request, key)
        try:
            async for item in stream:
                yield item
        finally:
            stream.cancel()

    async def __del__(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        self._registry.close()


def app_builder(args: Mapping[str, Any]) -> Any:
    """The application for Ray's own tooling: `serve run
    server.scaleout.ray_serve:app_builder model=/models/base ray.max_replicas=4`, or
    `import_path: server.scaleout.ray_serve:app_builder` in a `serve` config file with
    these args (deploy/ray/serve-config.yaml). Settings come from LORASWAP_* (a config
    file's runtime_env env_vars) and then `args`.

    Ray's tooling has no start-up hook of ours: /health answers as soon as the replicas
    are up (`loraswap serve --ray` holds it at 503 until the deployment finished)."""
    app = build_app(settings_from_args(args))
    return app


def _metrics_auth(settings: Settings) -> list[tuple[bytes, bytes]]:
    key = settings.metrics_key or settings.admin_key
    if key is None:
        return []
    return [(b"authorization", f"Bearer {key.get_secret_value()}".encode())]


def _unavailable(message: str) -> Response:
    return ingress.error_response(EngineUnavailable(message))


def _header(request: HttpRequest, name: bytes) -> bytes | None:
    return next((v for k, v in request.headers if k.lower() == name), None)


def ray_address(settings: Settings) -> str | None:
    """The cluster to join: the setting, else Ray's own RAY_ADDRESS; None: start one."""
    return settings.ray.address or os.environ.get("RAY_ADDRESS") or None


def serve_forever(settings: Settings) -> None:
    """Start a local Ray or join a cluster, deploy, serve until SIGTERM/SIGINT, then
    take the application down (and a Ray of our own with it)."""
    address = start_ray(settings)
    stop = threading.Event()
    try:
        # One HTTP entry, on the head node: a proxy per node would bind the same port
        # twice on one host, and a load balancer in front of a cluster picks its own.
        serve.start(
            proxy_location="HeadOnly", http_options={"host": settings.host, "port": settings.port}
        )
        handle = serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        handle.set_ready.remote().result()
        print(_serving(settings, address), flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        print("shutting down Ray Serve", flush=True)
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(coordinator_name(APP_NAME), namespace=_NAMESPACE))
        if address is None:
            with contextlib.suppress(Exception):
                serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


def start_ray(settings: Settings) -> str | None:
    """Join the cluster at ray_address, or start a Ray of our own (None)."""
    # Ray's workers must import this code, whether installed or run from a checkout.
    root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    address = ray_address(settings)
    if address is not None:
        # A cluster's workers do not inherit our environment: the job's runtime_env
        # carries the import path (the same path on every node: an image, a checkout).
        ray.init(
            address=address,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            logging_level=logging.WARNING,
        )
        return address
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        # "local": a Ray of our own, never a cluster `ray start` left a record of
        address="local",
        num_cpus=len(os.sched_getaffinity(0)),
        include_dashboard=False,
        object_store_memory=int(os.environ.get("LORASWAP_RAY_OBJECT_STORE_BYTES", 128 << 20)),
        logging_level=logging.WARNING,
    )
    return None


def _serving(settings: Settings, address: str | None) -> str:
    """The line that says the application is up: what, how many replicas, where."""
    r = settings.ray
    count = (
        f"{r.min_replicas or 1}-{r.max_replicas} autoscaled" if r.autoscaling else str(r.replicas)
    )
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    return (
        f"serving {settings.served_model_name} with {count} Ray Serve replicas on {where}, "
        f"http://{settings.host}:{settings.port}"
    )
