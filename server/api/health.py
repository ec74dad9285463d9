"""Liveness/readiness: 200 when the engine can serve, 503 otherwise."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import EngineDep

router = APIRouter(tags=["health"])


@router.get("/health", summary="200 when the engine can serve, 503 otherwise")
async def health(engine: EngineDep) -> dict[str, str]:
    await engine.check_health()  # raises EngineUnavailable -> 503
    return {"status": "ok"}
