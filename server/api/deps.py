"""Request-scoped getters: route signatures read like documentation.

Each `...Dep` is the type a route receives and where it comes from: one object the app
builds at startup (server/app.py) and keeps in `app.state`.
"""

from __future__ import annotations

from typing import Annotated, Any

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


def _app_state(name: str) -> Any:
    """A dependency on `app.state.<name>`; its type is the one `Annotated` names with it
    (FastAPI's `Depends` is untyped either way)."""

    def get(request: Request) -> object:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"  # as FastAPI's errors and the debugger name it
    return Depends(get)


def get_request_id(request: Request) -> str:
    """Set by the admission middleware (server/lifecycle.py) for every request."""
    request_id: str = request.state.request_id
    return request_id


GatewayDep = Annotated[Gateway, _app_state("gateway")]
RouterDep = Annotated[AdapterRouter, _app_state("router")]
EngineDep = Annotated[Engine, _app_state("engine")]
QuotasDep = Annotated[Admission, _app_state("quotas")]
MetricsDep = Annotated[Metrics, _app_state("metrics")]
ExposuresDep = Annotated[ExposureLog, _app_state("exposures")]
RampsDep = Annotated[Ramps, _app_state("ramps")]
GuardrailsDep = Annotated[Guardrails, _app_state("guardrails")]
ShadowsDep = Annotated[Shadows, _app_state("shadows")]
RequestIdDep = Annotated[str, Depends(get_request_id)]
PrincipalDep = Annotated[Principal, Depends(authenticate)]
