"""Request-scoped getters: route signatures read like documentation."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.adapters import AdapterRouter
from server.auth import Principal, authenticate
from server.engine.base import Engine
from server.experiments.guardrails import Guardrails
from server.experiments.log import ExposureLog
from server.experiments.ramps import Ramps
from server.experiments.shadow import Shadows
from server.metrics import Metrics
from server.quotas import Admission
from server.serving import Gateway


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def get_router(request: Request) -> AdapterRouter:
    router: AdapterRouter = request.app.state.router
    return router


def get_quotas(request: Request) -> Admission:
    quotas: Admission = request.app.state.quotas
    return quotas


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_request_id(request: Request) -> str:
    """Set by the admission middleware (server/lifecycle.py) for every request."""
    request_id: str = request.state.request_id
    return request_id


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
RouterDep = Annotated[AdapterRouter, Depends(get_router)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
PrincipalDep = Annotated[Principal, Depends(authenticate)]
QuotasDep = Annotated[Admission, Depends(get_quotas)]


def get_exposures(request: Request) -> ExposureLog:
    log: ExposureLog = request.app.state.exposures
    return log


def get_guardrails(request: Request) -> Guardrails:
    guardrails: Guardrails = request.app.state.guardrails
    return guardrails


def get_ramps(request: Request) -> Ramps:
    ramps: Ramps = request.app.state.ramps
    return ramps


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def get_shadows(request: Request) -> Shadows:
    shadows: Shadows = request.app.state.shadows
    return shadows


ExposuresDep = Annotated[ExposureLog, Depends(get_exposures)]
RampsDep = Annotated[Ramps, Depends(get_ramps)]
GuardrailsDep = Annotated[Guardrails, Depends(get_guardrails)]
ShadowsDep = Annotated[Shadows, Depends(get_shadows)]
