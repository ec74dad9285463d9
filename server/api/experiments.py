"""A/B experiments over HTTP: feedback on a response (/v1), the report of an alias (/admin).

Feedback is a tenant's word about one of its own responses: the exposure is looked up
by response id (or request id) among the caller's exposures only, and an id that is
unknown and one that belongs to another tenant get the same 404 (no existence leak). The
operator (admin key, or open mode) may give feedback on any.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters_registry.errors import AdapterNotFound
from adapters_registry.experiments import (
    Exposure,
    Feedback,
    GuardrailEvent,
    RampRecord,
    ShadowConfig,
    ShadowRun,
)
from adapters_registry.names import NAME_PATTERN
from adapters_registry.records import AliasRecord, Variant
from adapters_registry.tenants import usable_by
from server.adapters import AdapterRouter
from server.api.deps import (
    ExposuresDep,
    GuardrailsDep,
    MetricsDep,
    PrincipalDep,
    RampsDep,
    RouterDep,
    ShadowsDep,
)
from server.auth import require_admin
from server.errors import InvalidRequest, ModelNotFound, ResponseNotFound
from server.experiments import plot
from server.experiments.guardrails import Limits
from server.experiments.log import ExposureLog
from server.experiments.ramps import RampPlan
from server.experiments.report import build_report

router = APIRouter(tags=["experiments"])
admin_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

T = TypeVar("T")


def _alias(router_: AdapterRouter, name: str) -> AliasRecord:
    """The alias an experiment setting is put on (404 if there is none)."""
    alias = router_.registry.alias(name)
    if alias is None:
        raise AdapterNotFound(f"alias {name!r} not found", adapter=name)
    return alias


def _configured(value: T | None, name: str, what: str) -> T:
    """An alias's `what` (its guardrails, ramp, shadow), or the 404 of an alias without."""
    if value is None:
        raise _has_no(name, what)
    return value


def _has_no(name: str, what: str) -> AdapterNotFound:
    return AdapterNotFound(f"alias {name!r} has no {what}", adapter=name)


# What an id we hand out can look like (x-request-id's own pattern, server/lifecycle.py,
# with its prefix): anything else names no response, and never reaches the database.
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,256}$")


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str | None = Field(
        None,
        pattern=_ID.pattern,
        description="The response's id (`chatcmpl-...`, `cmpl-...`, `resp_...`).",
    )
    request_id: str | None = Field(None, pattern=_ID.pattern, description="Or its x-request-id.")
    metric: str = Field(
        "default",
        pattern=NAME_PATTERN.pattern,
        description="Which outcome this is (several per experiment), e.g. `thumbs`, `resolved`.",
    )
    label: Literal["positive", "negative", 0, 1] | None = Field(
        None, description='A binary outcome: "positive" / 1 or "negative" / 0.'
    )
    score: float | None = Field(None, allow_inf_nan=False, description="A numeric outcome.")

    @model_validator(mode="after")
    def _one_id_and_an_outcome(self) -> FeedbackBody:
        if (self.response_id is None) == (self.request_id is None):
            raise ValueError("give exactly one of response_id and request_id")
        if self.label is None and self.score is None:
            raise ValueError("give a label, a score, or both")
        return self

    @property
    def label_value(self) -> int | None:
        if self.label is None:
            return None
        return 1 if self.label in ("positive", 1) else 0


def _feedback(exposure: Exposure, f: Feedback) -> dict[str, Any]:
    return {
        "object": "feedback",
        "response_id": exposure.response_id,
        "request_id": exposure.request_id,
        "alias": exposure.alias,
        "variant": exposure.variant,
        "metric": f.metric,
        "label": f.label,
        "score": f.score,
        "created_at": f.created_at,
        "updated_at": f.updated_at,
    }


async def _find(
    log: ExposureLog, response_id: str | None, request_id: str | None, tenant: str | None
) -> Exposure | None:
    def mine() -> Exposure | None:
        found = log.store.find_exposure(response_id=response_id, request_id=request_id)
        return next((e for e in found if tenant is None or e.tenant == tenant), None)

    exposure = await asyncio.to_thread(mine)
    if exposure is None and log.pending:
        # The response may be so recent that its exposure still waits in the queue.
        await log.flush()
        exposure = await asyncio.to_thread(mine)
    return exposure


@router.post("/v1/feedback", summary="Report an outcome of a response (A/B experiments)")
async def post_feedback(
    body: FeedbackBody,
    principal: PrincipalDep,
    log: ExposuresDep,
    guardrails: GuardrailsDep,
    metrics: MetricsDep,
) -> dict[str, Any]:
    """Idempotent per (response, metric): the last outcome sent is the one kept."""
    exposure = await _find(log, body.response_id, body.request_id, principal.tenant_name)
    if exposure is None:
        given = body.response_id or body.request_id
        which = "response_id" if body.response_id else "request_id"
        raise ResponseNotFound(f"no response {given!r} served through an alias", param=which)
    record = await asyncio.to_thread(
        log.store.put_feedback,
        exposure.exposure_id,
        body.metric,
        label=body.label_value,
        score=body.score,
    )
    if record.created_at == record.updated_at:  # a first outcome: guardrails and metrics count it
        metrics.observe_feedback(exposure, record)
        value = record.label if record.label is not None else record.score
        if value is not None:
            guardrails.feedback(exposure, record.metric, float(value))
    return _feedback(exposure, record)


@router.get("/v1/exposures/{response_id}", summary="Which arm served one of your responses")
async def get_exposure(
    response_id: str, principal: PrincipalDep, log: ExposuresDep
) -> dict[str, Any]:
    exposure = None
    if _ID.fullmatch(response_id):
        exposure = await _find(log, response_id, None, principal.tenant_name)
    if exposure is None:
        raise ResponseNotFound(f"no response {response_id!r} served through an alias")
    return _exposure(exposure)


def _exposure(e: Exposure) -> dict[str, Any]:
    return {
        "object": "exposure",
        "response_id": e.response_id,
        "request_id": e.request_id,
        "alias": e.alias,
        "variant": e.variant,
        "adapter": e.adapter,
        "version": e.version,
        "content_digest": e.content_digest,
        "tenant": e.tenant,
        "user_hash": e.user_hash,
        "created_at": e.created_at,
        "status": e.status,
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "ttft_s": e.ttft_s,
        "latency_s": e.latency_s,
    }


def parse_time(value: str | None, param: str) -> float | None:
    """Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            seconds = moment.timestamp()
        except (ValueError, OverflowError):
            raise InvalidRequest(
                f"{param}: {value!r} is neither Unix seconds nor an ISO 8601 time", param=param
            ) from None
    if not math.isfinite(seconds):
        raise InvalidRequest(f"{param} must be finite", param=param)
    return seconds


Since = Annotated[str | None, Query(description="Window start: Unix seconds or ISO 8601.")]
Until = Annotated[str | None, Query(description="Window end (excluded).")]


async def _experiment(
    name: str, router_: AdapterRouter, log: ExposureLog, start: float | None, end: float | None
) -> tuple[tuple[Variant, ...], list[Exposure], list[tuple[str, Feedback]], list[ShadowRun]]:
    """An alias's arms and its window's exposures, feedback and shadow runs (404: no such
    alias, and none in the log either)."""
    alias = router_.registry.alias(name)
    if alias is None and not NAME_PATTERN.fullmatch(name):
        raise AdapterNotFound(f"alias {name!r} not found", adapter=name)  # none ever was
    await log.flush()  # what has been served so far is in the report

    def read() -> tuple[list[Exposure], list[tuple[str, Feedback]], list[ShadowRun]]:
        return (
            log.store.exposures(name, since=start, until=end),
            log.store.feedback(name, since=start, until=end),
            log.store.shadow_runs(name, since=start, until=end),
        )

    exposures, feedback, shadow_runs = await asyncio.to_thread(read)
    if alias is None and not exposures:
        raise AdapterNotFound(f"alias {name!r} not found", adapter=name)
    return (alias.variants if alias is not None else ()), exposures, feedback, shadow_runs


@admin_router.get(
    "/aliases/{name}/experiment", summary="Per-arm statistics of an alias's experiment"
)
async def experiment_report(
    name: str,
    router_: RouterDep,
    log: ExposuresDep,
    since: Since = None,
    until: Until = None,
    control: Annotated[str | None, Query(description="The control arm [the first].")] = None,
) -> dict[str, Any]:
    start, end = parse_time(since, "since"), parse_time(until, "until")
    variants, exposures, feedback, shadow_runs = await _experiment(name, router_, log, start, end)
    try:
        return await asyncio.to_thread(
            build_report,
            name,
            variants,
            exposures,
            feedback,
            control=control,
            since=start,
            until=end,
            shadow_runs=shadow_runs,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="control") from None


@admin_router.get(
    "/aliases/{name}/experiment/plot.png",
    summary="PNG: each metric's running mean with its 95% interval, per arm, over time",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The plot."}},
)
async def experiment_plot(
    name: str,
    router_: RouterDep,
    log: ExposuresDep,
    since: Since = None,
    until: Until = None,
    metric: Annotated[
        str | None,
        Query(description="The feedback metric to draw [every metric of the window]."),
    ] = None,
) -> Response:
    """One chart per metric (and per kind: labels, scores) with outcomes in the window,
    for the first `MAX_METRICS` (6) metrics by name unless one is named. With no feedback
    in the window yet the image says so (200); a named metric that has no outcomes in
    the window is a 400 naming the metrics that have."""
    start, end = parse_time(since, "since"), parse_time(until, "until")
    variants, exposures, feedback, _ = await _experiment(name, router_, log, start, end)
    metrics = sorted({f.metric for _, f in feedback})
    if metric is not None:
        if metric not in metrics:
            raise InvalidRequest(
                f"no feedback of metric {metric!r} in this window (it has: "
                f"{', '.join(metrics[:20]) or 'none'}{', ...' if len(metrics) > 20 else ''})",
                param="metric",
            )
        metrics = [metric]
    note = ""
    if len(metrics) > plot.MAX_METRICS:
        note = f"the first {plot.MAX_METRICS} of {len(metrics)} metrics: name one with ?metric="
        metrics = metrics[: plot.MAX_METRICS]

    def draw() -> bytes:
        drawn = plot.panels(variants, exposures, feedback, metrics)
        return plot.render(name, drawn, _window_text(start, end), note)

    png = await asyncio.to_thread(draw)
    return Response(png, media_type="image/png", headers={"cache-control": "no-store"})


def _window_text(start: float | None, end: float | None) -> str:
    def at(t: float | None, default: str) -> str:
        return (
            default
            if t is None
            else datetime.fromtimestamp(t, timezone.utc).isoformat(" ", "seconds")
        )

    return f"{at(start, 'start')} to {at(end, 'now')}"


class GuardrailsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_exposures: int = Field(
        100, ge=1, le=1_000_000_000, description="Exposures an arm needs before it is judged."
    )
    max_error_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Largest share of 5xx answers an arm may have.",
    )
    max_p95_latency_ratio: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Largest p95 latency of an arm over the control's, e.g. 1.5.",
    )
    metric: str | None = Field(
        None, pattern=NAME_PATTERN.pattern, description="A feedback metric to guard."
    )
    min_metric_ratio: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Smallest mean of `metric` over the control's, e.g. 0.8.",
    )
    control: str | None = Field(None, description="The control arm [the alias's first].")

    @model_validator(mode="after")
    def _consistent(self) -> GuardrailsBody:
        if (self.metric is None) != (self.min_metric_ratio is None):
            raise ValueError("metric and min_metric_ratio go together")
        if self.max_error_rate is None and self.max_p95_latency_ratio is None and not self.metric:
            raise ValueError("set at least one limit")
        return self


def _guardrails(name: str, limits: Limits | None, events: list[GuardrailEvent]) -> dict[str, Any]:
    return {
        "alias": name,
        "limits": None if limits is None else asdict(limits),
        "events": [
            {
                "variant": e.variant,
                "rule": e.rule,
                "detail": e.detail,
                "created_at": e.created_at,
            }
            for e in events
        ],
    }


@admin_router.put("/aliases/{name}/guardrails", summary="Set an alias's guardrail limits")
async def put_guardrails(
    name: str, body: GuardrailsBody, router_: RouterDep, guardrails: GuardrailsDep
) -> dict[str, Any]:
    alias = _alias(router_, name)
    if body.control is not None and body.control not in {v.key for v in alias.variants}:
        raise InvalidRequest(f"control {body.control!r} is not an arm of {name!r}", param="control")
    limits = Limits(**body.model_dump())
    await guardrails.set_limits(name, limits)
    events = await asyncio.to_thread(guardrails.store.events, name)
    return _guardrails(name, limits, events)


@admin_router.get("/aliases/{name}/guardrails", summary="An alias's limits and rollbacks")
async def get_guardrails_of(name: str, guardrails: GuardrailsDep) -> dict[str, Any]:
    if not NAME_PATTERN.fullmatch(name):
        raise _has_no(name, "guardrails")
    limits = guardrails.limits(name)
    events = await asyncio.to_thread(guardrails.store.events, name)
    if limits is None and not events:
        raise _has_no(name, "guardrails")
    return _guardrails(name, limits, events)


@admin_router.delete("/aliases/{name}/guardrails", summary="Remove an alias's limits")
async def delete_guardrails(name: str, guardrails: GuardrailsDep) -> dict[str, Any]:
    _configured(guardrails.limits(name), name, "guardrails")
    await guardrails.set_limits(name, None)
    events = await asyncio.to_thread(guardrails.store.events, name)
    return _guardrails(name, None, events)


# At least one weight unit (server/experiments/ramps.py: 1% = 100 of 10,000).
Percent = Annotated[float, Field(ge=0.01, le=100, allow_inf_nan=False)]


class RampBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(description="The arm to ramp up, e.g. `support@2`.")
    steps: list[Percent] = Field(
        min_length=1,
        max_length=100,
        description="Its share of the traffic at each step, in percent, increasing: "
        "[1, 5, 25, 50, 100].",
    )
    every_exposures: int | None = Field(
        None, ge=1, le=1_000_000_000, description="Next step after this many exposures."
    )
    every_s: float | None = Field(
        None,
        gt=0,
        le=366 * 86400,
        allow_inf_nan=False,
        description="Next step after this many seconds.",
    )

    @model_validator(mode="after")
    def _schedule(self) -> RampBody:
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must increase")
        if self.every_exposures is None and self.every_s is None:
            raise ValueError("give every_exposures, every_s, or both")
        return self


def _ramp(record: RampRecord) -> dict[str, Any]:
    plan = RampPlan.of(record)
    return {
        "alias": record.alias,
        **plan.config(),
        "step": record.step,
        "percent": plan.steps[record.step],
        "state": record.state,
        "step_started_at": record.step_started_at,
        "updated_at": record.updated_at,
    }


@admin_router.put("/aliases/{name}/ramp", summary="Ramp an arm up while guardrails hold")
async def put_ramp(
    name: str, body: RampBody, router_: RouterDep, ramps: RampsDep
) -> dict[str, Any]:
    alias = _alias(router_, name)
    keys = [v.key for v in alias.variants]
    if body.candidate not in keys:
        raise InvalidRequest(
            f"candidate {body.candidate!r} is not an arm of {name!r}: {keys}", param="candidate"
        )
    if len(keys) < 2:
        raise InvalidRequest(f"alias {name!r} has one arm: nothing to ramp from", param="candidate")
    plan = RampPlan(body.candidate, tuple(body.steps), body.every_exposures, body.every_s)
    return _ramp(await ramps.start(alias, plan))


@admin_router.get("/aliases/{name}/ramp", summary="An alias's ramp and where it stands")
async def get_ramp(name: str, ramps: RampsDep) -> dict[str, Any]:
    return _ramp(_configured(ramps.get(name), name, "ramp"))


@admin_router.delete("/aliases/{name}/ramp", summary="Stop a ramp (the weights stay)")
async def delete_ramp(name: str, ramps: RampsDep) -> dict[str, Any]:
    record = _configured(ramps.get(name), name, "ramp")
    await ramps.stop(name)
    return {**_ramp(record), "state": "stopped"}


# `name` or `name@N`, as an alias's variants are written.
_ADAPTER_KEY = re.compile(r"^([a-z0-9][a-z0-9._-]{0,63})(?:@([1-9][0-9]{0,17}))?$")


class ShadowBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(
        pattern=_ADAPTER_KEY.pattern,
        description="The shadow: `name` (its current version at each run) or `name@N`.",
    )
    fraction: float = Field(
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Share of the alias's requests that also run on the shadow, drawn "
        "per request (1 = all; 0 = none, kept configured).",
    )


def _shadow(config: ShadowConfig) -> dict[str, Any]:
    return {"alias": config.alias, "adapter": config.key, "fraction": config.fraction}


@admin_router.put(
    "/aliases/{name}/shadow", summary="Run a share of an alias's requests on a shadow too"
)
async def put_shadow(
    name: str, body: ShadowBody, router_: RouterDep, shadows: ShadowsDep
) -> dict[str, Any]:
    """Sampled requests also run on the shadow adapter, after their response, at the
    lowest priority, dropped first under load; its replies are recorded, never returned."""
    alias = _alias(router_, name)
    match = _ADAPTER_KEY.fullmatch(body.adapter)
    assert match is not None  # the body's pattern
    adapter, number = match.group(1), None if match.group(2) is None else int(match.group(2))
    try:
        await router_.version_of(adapter, number, None)  # registers a folder's adapter too
    except ModelNotFound:
        raise InvalidRequest(f"adapter {body.adapter!r} not found", param="adapter") from None
    record = router_.registry.adapter(adapter)
    # The rule of an alias's variants (adapters_registry/registry.py put_alias): a shadow
    # must be usable by every caller of the alias (each run checks the caller again).
    if record is None or not (record.shared if alias.shared else usable_by(record, alias.owner)):
        audience = "every tenant" if alias.shared else f"tenant {alias.owner!r}"
        raise InvalidRequest(
            f"alias {name!r}: adapter {adapter!r} is not usable by {audience}", param="adapter"
        )
    config = ShadowConfig(alias=name, adapter=adapter, version=number, fraction=body.fraction)
    await shadows.set(name, config)
    return _shadow(config)


@admin_router.get("/aliases/{name}/shadow", summary="An alias's shadow adapter and fraction")
async def get_shadow(name: str, shadows: ShadowsDep) -> dict[str, Any]:
    return _shadow(_configured(shadows.get(name), name, "shadow"))


@admin_router.delete("/aliases/{name}/shadow", summary="Stop an alias's shadow traffic")
async def delete_shadow(name: str, shadows: ShadowsDep) -> dict[str, Any]:
    config = _configured(shadows.get(name), name, "shadow")
    await shadows.set(name, None)
    return _shadow(config)
