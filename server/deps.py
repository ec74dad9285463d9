"""Request-scoped getters: route signatures read like documentation."""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from fastapi import Depends, Request

from server.adapters import AdapterRouter
from server.engine.base import Engine
from server.serving import Serving

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def get_serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


def get_router(request: Request) -> AdapterRouter:
    router: AdapterRouter = request.app.state.router
    return router


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_request_id(request: Request) -> str:
    """The caller's x-request-id when it is sane (it reaches logs and headers), else new."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


ServingDep = Annotated[Serving, Depends(get_serving)]
RouterDep = Annotated[AdapterRouter, Depends(get_router)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
