"""Ray Serve deployment: N replicas, each with its own engine, and adapter affinity.

The only module importing ray. `loraswap serve --ray --replicas N` runs:

    HTTP -> Ray Serve proxy -> Ingress (1) -> Replica (N), each create_app(settings)

- **Ingress** first admits the request (server/ingress.py: body limits, the upload limit
  only for the admin on the upload routes, authentication and tenant access of inference
  calls: nothing is routed or loaded for a caller that may not use the model), then
  resolves `model` (+ the A/B user) to the concrete `<adapter>@<version>` with
  the shared registry (server/placement.py: routing_key) and calls a replica with that as
  Ray Serve's multiplexed model id: Ray routes it to a replica that already holds it
  (`@serve.multiplexed`), else to the least loaded one, which loads it. Everything else
  (admin API, /v1/models, base-model requests) goes to any replica. The request itself
  crosses as bytes and the response comes back as a stream (SSE stays SSE).
- **Replica** runs the whole single-process app (auth, quotas, metrics, errors) in-process
  on the request, with its own vLLM engine; it keeps at most `adapters_per_replica`
  versions in its engine (server/placement.py: Residency, LRU), the same number Ray's
  multiplexer assumes, and says in `x-loraswap-replica` / `x-loraswap-cold-load` which
  replica served the request and whether it had to load the adapter.
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from server import ingress
from server.app import create_app, open_registry
from server.errors import EngineUnavailable
from server.placement import HttpRequest, Residency, ResponseStart, call_asgi, parse_key
from server.settings import Settings

log = logging.getLogger("loraswap.ray")

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def cpus_of_replica(rank: int, replicas: int, cores: int) -> str:
    """The cores replica `rank` binds its engine's threads to: the cores split evenly
    (two engines spinning on the same cores would halve each other's speed)."""
    if replicas >= cores:
        core = rank % cores
        return f"{core}"
    per = cores // replicas
    return f"{rank * per}-{rank * per + per - 1}"


def build_app(settings: Settings, replicas: int, adapters_per_replica: int) -> Any:
    """The Ray Serve application (Ingress bound to Replica)."""
    max_ongoing = settings.engine.max_num_seqs

    @serve.deployment(
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        health_check_period_s=5,
    )
    class Replica:
        async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
            context = serve.get_replica_context()
            rank = context.rank.rank
            if settings.engine.cpu_threads_bind == "auto":
                cores = len(os.sched_getaffinity(0))
                bind = cpus_of_replica(rank, replicas, cores)
                engine = settings.engine.model_copy(update={"cpu_threads_bind": bind})
                settings = settings.model_copy(update={"engine": engine})
            self._name = f"replica-{rank}".encode()
            self._app = create_app(settings)
            self._lifespan: Any = self._app.router.lifespan_context(self._app)
            await self._lifespan.__aenter__()
            self._router = self._app.state.router
            self._residency = Residency(adapters_per_replica)
            self._lock = asyncio.Lock()

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)  # type: ignore[untyped-decorator]
        async def _multiplexed(self, key: str) -> str:
            # Tells Ray this replica holds `key`; the engine side is _place's.
            return key

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

        async def handle(
            self, request: HttpRequest, key: str | None
        ) -> AsyncIterator[ResponseStart | bytes]:
            headers = [(b"x-loraswap-replica", self._name)]
            # Read your writes: an admin call right after another one, answered by another
            # replica, must see it (one single-row read when nothing changed).
            if request.path.startswith("/admin") and await asyncio.to_thread(
                self._router.registry.refresh
            ):
                await self._router.release_unreachable()
            if key is not None:
                if serve.get_multiplexed_model_id():
                    await self._multiplexed(key)
                hit = await self._place(key)
                headers.append((b"x-loraswap-cold-load", b"0" if hit else b"1"))
            async for item in call_asgi(self._app, request, headers):
                yield item

        async def __del__(self) -> None:
            lifespan = getattr(self, "_lifespan", None)
            if lifespan is not None:
                self._lifespan = None
                await lifespan.__aexit__(None, None, None)

    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @serve.deployment(
        max_ongoing_requests=settings.max_in_flight,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
    )
    @serve.ingress(api)
    class Ingress:
        async def __init__(self, replica: Any, settings: Settings) -> None:  # type: ignore[misc]
            self._replica = replica
            self._registry, _ = open_registry(settings)
            self._gate = ingress.Gate(settings, self._registry)
            self._ready = False
            self._poll: asyncio.Task[None] | None = None
            if settings.registry.refresh_interval_s > 0:
                self._poll = asyncio.create_task(self._follow(settings.registry.refresh_interval_s))

        async def _follow(self, interval_s: float) -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await asyncio.to_thread(self._registry.refresh)
                except Exception:
                    log.exception("registry refresh failed; retrying in %.1fs", interval_s)

        def set_ready(self) -> None:
            self._ready = True

        @api.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
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

    return Ingress.bind(Replica.bind(settings), settings)  # type: ignore[attr-defined]


def _unavailable(message: str) -> Response:
    return ingress.error_response(EngineUnavailable(message))


def _header(request: HttpRequest, name: bytes) -> bytes | None:
    return next((v for k, v in request.headers if k.lower() == name), None)


def serve_forever(settings: Settings, replicas: int, adapters_per_replica: int) -> None:
    """Start a local Ray, deploy, serve until SIGTERM/SIGINT, then shut everything down."""
    # Ray's workers must import this code, whether installed or run from a checkout.
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p
    )
    ray.init(
        num_cpus=len(os.sched_getaffinity(0)),
        include_dashboard=False,
        object_store_memory=int(os.environ.get("LORASWAP_RAY_OBJECT_STORE_BYTES", 128 << 20)),
        logging_level=logging.WARNING,
    )
    stop = threading.Event()
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        handle = serve.run(
            build_app(settings, replicas, adapters_per_replica), name="loraswap", route_prefix="/"
        )
        handle.set_ready.remote().result()
        print(
            f"serving {settings.served_model_name} with {replicas} Ray Serve replicas on "
            f"http://{settings.host}:{settings.port}",
            flush=True,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        print("shutting down Ray Serve", flush=True)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
