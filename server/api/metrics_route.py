"""GET /metrics: Prometheus text format, gauges refreshed at scrape time.

Behind the metrics key or the admin key (server/auth.py: require_metrics): the metrics
name private adapters, alias arms, tenants and their token use.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import EngineDep, QuotasDep, RouterDep
from server.auth import require_metrics
from server.metrics import Metrics

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_metrics)])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(
    request: Request, router_: RouterDep, engine: EngineDep, quotas: QuotasDep
) -> Response:
    m: Metrics = request.app.state.metrics
    loaded = router_.loaded()
    m.adapters_resident.set(len(loaded))
    m.adapters_registered.set(len(router_.registry.adapters()))
    m.in_flight.set(quotas.in_flight)
    m.engine_running.set(await engine.num_running())
    running = [handle.name.split("@")[0] for handle, leases in loaded if leases > 0]
    body = m.render(max_lora=request.app.state.max_loras, running_adapters=running)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
