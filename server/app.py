"""create_app(settings, engine=None) -> FastAPI: wiring, lifespan and error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_registry import AdapterError, BaseModelShapes, DirectoryCatalog, Limits
from adapters_registry.experiments import ExperimentStore, RampStore
from adapters_registry.registry import Registry, RegistryConfig
from adapters_registry.sources import SourcesConfig
from server.adapters import AdapterRouter
from server.api import admin, experiments, health, metrics_route, openai
from server.auth import OpenMode
from server.engine.base import Engine
from server.engine.openai_layer import OpenAILayer, VLLMError, as_server_error, vllm_args
from server.errors import ErrorKind, InvalidRequest, ServerError, describe, error_body
from server.experiments.guardrails import Guardrails
from server.experiments.log import ExposureLog
from server.experiments.ramps import Ramps
from server.experiments.shadow import Shadows
from server.lifecycle import AdmissionMiddleware, Lifecycle, upload_limit
from server.metrics import Metrics, RequestInfo, log_request
from server.quotas import Admission, Quotas
from server.serving import Gateway
from server.settings import Settings

_INVALID = "invalid_request_error"
log = logging.getLogger("loraswap.registry")


def open_registry(settings: Settings) -> tuple[Registry, DirectoryCatalog | None]:
    """The registry (SQLite or PostgreSQL) and the adapters-directory catalog."""
    if settings.model is None:
        raise ValueError("settings.model is required")
    base = BaseModelShapes.from_dir(settings.model, settings.served_model_name)
    limits = Limits(max_rank=settings.engine.max_lora_rank, max_bytes=settings.max_adapter_bytes)
    catalog = None
    if settings.adapters_dir is not None:
        catalog = DirectoryCatalog(settings.adapters_dir, base, limits)
    config = RegistryConfig(
        database=settings.registry_database,
        storage_dir=settings.storage_path,
        allowed_roots=settings.adapter_roots,
        cache_max_bytes=settings.download_cache_bytes,
        limits=limits,
        sources=SourcesConfig(
            **settings.sources.model_dump(exclude={"http_allowed_networks"}),
            http_allowed_networks=tuple(settings.sources.http_allowed_networks),
        ),
    )
    return Registry(config, base), catalog


def build_router(settings: Settings, engine: Engine, metrics: Metrics) -> AdapterRouter:
    """The registry, the adapters-directory catalog, the router."""
    registry, catalog = open_registry(settings)
    # The router holds no more versions than the engine keeps in memory, and tells the
    # download cache which of them the engine may still read.
    resident = max(settings.engine.max_cpu_loras, settings.engine.max_loras)
    return AdapterRouter(
        settings.served_model_name, registry, catalog, engine, metrics, max_resident=resident
    )


def start_engine(settings: Settings, args: Namespace) -> Engine:
    from server.engine.vllm import VllmEngine

    return VllmEngine.start(args, settings.engine)


def open_mode_allowed(settings: Settings) -> bool:
    """Whether serving without tenants (anyone may call) is acceptable on this address."""
    return open_mode(settings) != "off"


def open_mode(settings: Settings) -> OpenMode:
    """Whom a server without tenants serves: on a loopback bind only local callers (each
    request's peer is loopback and no proxy header is present: server/auth.py), so that a
    reverse proxy, sidecar or tunnel on the same host cannot turn it into open access;
    everyone only when the operator said so."""
    if settings.unsafe_allow_open_network:
        return "any"
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    return "local" if loopback else "off"


def _refuse_open_network(settings: Settings, registry: Registry) -> None:
    """No tenants means anyone can use the server: fine on loopback, not beyond it.

    Beyond loopback, a server without tenants accepts only the admin key (checked per
    request in auth.authenticate, so deleting the last tenant never opens it); without an
    admin key either it would be open or useless, so it refuses to start.
    """
    if registry.has_tenants() or open_mode_allowed(settings) or settings.admin_key:
        return
    raise RuntimeError(
        f"refusing to serve on {settings.host} without API keys: anyone could use it. "
        "Set LORASWAP_ADMIN_KEY and create tenants, bind 127.0.0.1, or pass "
        "--unsafe-allow-open-network"
    )


async def follow_registry(
    registry: Registry,
    interval_s: float,
    changed: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Pick up registry changes made by other replicas sharing the database, every
    `interval_s`; `changed` runs after each refresh that found some."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await asyncio.to_thread(registry.refresh) and changed is not None:
                await changed()
        except Exception:  # the database away for a moment must not end the polling
            log.exception("registry refresh failed; retrying in %.1fs", interval_s)


def create_app(
    settings: Settings, engine: Engine | None = None, quotas: Admission | None = None
) -> FastAPI:
    """The ASGI app. Pass `engine` to reuse one (tests); otherwise vLLM starts in lifespan.
    `quotas`: admission shared with other replicas (Ray); else this process's own."""
    app = FastAPI(
        title="loraswap",
        summary="OpenAI-compatible multi-LoRA inference server on vLLM",
        version="0.1.0",
        lifespan=_lifespan(settings, engine, quotas),
    )
    app.state.lifecycle = Lifecycle()
    app.state.metrics = Metrics(settings.metrics_max_label_values)
    app.state.max_loras = settings.engine.max_loras
    app.add_middleware(
        AdmissionMiddleware,
        lifecycle=app.state.lifecycle,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=upload_limit(settings.max_adapter_bytes),
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
        observe=_observer(app),
    )
    for routes in (
        openai.router,
        admin.router,
        experiments.router,
        experiments.admin_router,
        health.router,
        metrics_route.router,
    ):
        app.include_router(routes)
    _install_error_handlers(app)
    return app


def _observer(app: FastAPI) -> Callable[[RequestInfo], None]:
    """What happens to each finished request (the admission middleware calls it)."""
    metrics: Metrics = app.state.metrics

    def observe(info: RequestInfo) -> None:
        metrics.observe(info)
        log_request(info)
        exposures: ExposureLog | None = getattr(app.state, "exposures", None)
        if exposures is not None:
            exposures.record(info)  # served through an alias: its exposure row, queued

    return observe


def _lifespan(
    settings: Settings, engine: Engine | None, quotas: Admission | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Startup and shutdown: the engine (unless given), serving, experiments, the tasks
    that live as long as the app; stopped in the reverse order."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        args = vllm_args(settings)
        eng = start_engine(settings, args) if engine is None else engine
        router, layer = _start_serving(app, settings, eng, args, quotas)
        exps = await _Experiments.start(app, settings, router, layer)
        tasks = exps.start_tasks()
        for record in router.registry.adapters():
            if record.pinned:
                await router.warm(record.name)
        if settings.registry.refresh_interval_s > 0:
            follow = follow_registry(
                router.registry, settings.registry.refresh_interval_s, router.release_unreachable
            )
            tasks.insert(0, asyncio.create_task(follow))  # stopped first
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await exps.close()
            router.registry.close()
            if engine is None:  # ours
                eng.shutdown()

    return lifespan


def _start_serving(
    app: FastAPI, settings: Settings, eng: Engine, args: Namespace, quotas: Admission | None
) -> tuple[AdapterRouter, OpenAILayer]:
    """The router over the registry, who may call, admission and the Gateway, in app.state
    (server/api/deps.py reads them there)."""
    router = build_router(settings, eng, app.state.metrics)
    app.state.engine = eng
    app.state.router = router
    _refuse_open_network(settings, router.registry)
    app.state.open_mode = open_mode(settings)
    app.state.quotas = quotas if quotas is not None else Quotas(settings.max_in_flight)
    layer = OpenAILayer(eng.engine_client, args, settings.served_model_name)
    app.state.gateway = Gateway(router, layer, app.state.quotas, settings.max_tokens_cap)
    app.state.admin_key = (
        settings.admin_key.get_secret_value() if settings.admin_key is not None else None
    )
    app.state.metrics_key = (
        settings.metrics_key.get_secret_value() if settings.metrics_key is not None else None
    )
    return router, layer


@dataclass
class _Experiments:
    """A/B experiments (server/experiments): the exposure log and what listens to it."""

    exposures: ExposureLog
    guardrails: Guardrails
    ramps: Ramps
    shadows: Shadows

    @classmethod
    async def start(
        cls, app: FastAPI, settings: Settings, router: AdapterRouter, layer: OpenAILayer
    ) -> _Experiments:
        metrics: Metrics = app.state.metrics
        registry = router.registry
        # The exposure log, in the registry's database, written by a background task.
        app.state.exposures = exposures = ExposureLog(
            ExperimentStore(registry.database), settings.experiments, metrics
        )
        # Guardrails judge each arm from the exposures as they are recorded.
        app.state.guardrails = guardrails = Guardrails(registry, exposures.store, metrics)
        await asyncio.to_thread(guardrails.load)
        exposures.listeners.append(guardrails.observe)
        # Ramps step an alias's candidate up while the guardrails hold.
        app.state.ramps = ramps = Ramps(registry, RampStore(registry.database), exposures.store)
        await asyncio.to_thread(ramps.load)
        exposures.listeners.append(ramps.observe)
        # Exposures and errors per alias arm, for the dashboard's Experiments row.
        exposures.listeners.append(metrics.observe_exposure)
        # Shadow traffic: sampled requests run again on an alias's shadow adapter.
        app.state.shadows = shadows = Shadows(
            router, layer, app.state.quotas, exposures, metrics, settings.experiments
        )
        await asyncio.to_thread(shadows.load)
        app.state.gateway.shadows = shadows
        return cls(exposures, guardrails, ramps, shadows)

    def start_tasks(self) -> list[asyncio.Task[None]]:
        """The ramps' stepper and the exposure writer, in the order they are stopped."""
        writer = asyncio.create_task(self.exposures.run())
        return [asyncio.create_task(self.ramps.run()), writer]

    async def close(self) -> None:
        await self.ramps.settle()
        await self.shadows.close()
        await self.exposures.close()  # what the last requests left in the queue


def _install_error_handlers(app: FastAPI) -> None:
    async def known(_: Request, exc: Exception) -> JSONResponse:
        kind, body = describe(exc)
        retry_after = getattr(exc, "retry_after", None)
        headers = {"retry-after": str(math.ceil(retry_after))} if retry_after else None
        return JSONResponse(body, status_code=kind.status, headers=headers)

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_response(exc)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        # 404 for unknown routes, 405 for wrong methods: OpenAI's shape too.
        assert isinstance(exc, StarletteHTTPException)
        kind = ErrorKind(
            exc.status_code, _INVALID if exc.status_code < 500 else "server_error", None
        )
        return JSONResponse(
            error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers
        )

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ServerError, known)
    app.add_exception_handler(AdapterError, known)
    app.add_exception_handler(RequestValidationError, invalid)

    async def from_vllm(request: Request, exc: Exception) -> JSONResponse:
        # vLLM's own errors, e.g. raised by its request models' validators while the body
        # is parsed (they are not ValueErrors, so pydantic lets them through).
        return await known(request, as_server_error(exc))

    app.add_exception_handler(VLLMError, from_vllm)
    app.add_exception_handler(Exception, known)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """400 in OpenAI's shape, naming the first offending field as `param`."""
    errors: list[dict[str, Any]] = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        message, param = "request body is not valid JSON", None
    else:
        param = _dotted(loc) or None
        message = f"{first.get('msg', 'invalid value')}" + (f" (param '{param}')" if param else "")
    kind: ErrorKind = describe(InvalidRequest(message))[0]
    return JSONResponse(error_body(message, kind, param), status_code=kind.status)


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_type_tag(part):
            out += f".{part}" if out else str(part)
    return out


def _is_type_tag(part: str) -> bool:
    # pydantic puts union member tags in locations ('str', 'list[int]', 'function-after[...]')
    return part in {"str", "int", "float", "bool"} or "[" in part
