"""OpenAI-compatible routes. Thin: parse, hand to Serving, choose JSON or SSE."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.deps import PrincipalDep, RequestIdDep, RouterDep, ServingDep
from server.metrics import RequestInfo
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import Caller, Prepared, Serving

router = APIRouter(prefix="/v1", tags=["openai"])

_DISCONNECT_POLL_S = 0.2


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    serving: ServingDep,
    request_id: RequestIdDep,
    principal: PrincipalDep,
) -> Any:
    caller = Caller(tenant=principal.tenant, user=_user(body.user, request))
    prepared = _on_finish(request, await serving.prepare_chat(body, request_id, caller))
    return await _respond(serving, prepared, request, stream=body.stream)


@router.post("/completions", summary="Text completion (OpenAI-compatible)")
async def completions(
    body: CompletionRequest,
    request: Request,
    serving: ServingDep,
    request_id: RequestIdDep,
    principal: PrincipalDep,
) -> Any:
    caller = Caller(tenant=principal.tenant, user=_user(body.user, request))
    prepared = _on_finish(request, await serving.prepare_completion(body, request_id, caller))
    return await _respond(serving, prepared, request, stream=body.stream)


@router.get("/models", summary="The base model, every adapter and every alias")
async def list_models(router_: RouterDep, principal: PrincipalDep) -> Response:
    # The whole list, as OpenAI's /v1/models (no paging there); encoded once per registry
    # change and tenant: 1.1 MB at 10,000 adapters, served again as the same bytes.
    base = router_.base_name

    def render(adapters: list[str], aliases: list[str]) -> bytes:
        data: list[dict[str, Any]] = [_model(base, None)]
        data += [_model(f"{base}:{name}", base) for name in adapters]
        data += [{**_model(f"{base}:{name}", base), "kind": "alias"} for name in aliases]
        # As JSONResponse encodes.
        return json.dumps(
            {"object": "list", "data": data},
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        ).encode()

    body = router_.models_body(principal.tenant_name, render)
    return Response(body, media_type="application/json")


def _model(model_id: str, parent: str | None) -> dict[str, Any]:
    # `root` is the base name, never a filesystem path (vLLM exposes the path there).
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "loraswap",
        "root": parent or model_id,
        "parent": parent,
    }


def _on_finish(request: Request, p: Prepared) -> Prepared:
    """Release the quota ticket when the response has fully gone (see server/lifecycle.py):
    the one place that runs whatever happens to the request, disconnects included. Also
    tell the request's log line and metrics what served it."""
    if p.ticket is not None:
        request.state.finalizers = [*getattr(request.state, "finalizers", []), p.ticket.release]
    info: RequestInfo | None = getattr(request.state, "info", None)
    if info is not None:
        p.info = info
        info.model = p.target.model
        info.prompt_tokens = len(p.prompt_ids)
        info.tenant = p.ticket.tenant or "" if p.ticket is not None else ""
        if p.target.version is not None:
            info.adapter = p.target.version.adapter
            info.version = str(p.target.version.version)
        info.variant = p.target.variant or ""
    return p


def _user(body_user: str | None, request: Request) -> str | None:
    """Who the request is for, for sticky A/B assignment: `user`, else `x-user-id`."""
    return body_user or request.headers.get("x-user-id") or None


def _headers(p: Prepared) -> dict[str, str]:
    """Every response says what served it (x-request-id is added by the middleware)."""
    headers = {}
    version = p.target.version
    if version is not None:
        headers["x-adapter"] = version.adapter
        headers["x-adapter-version"] = str(version.version)
    if p.target.alias is not None and p.target.variant is not None:
        headers["x-alias"] = p.target.alias
        headers["x-alias-variant"] = p.target.variant
    return headers


async def _respond(serving: Serving, p: Prepared, request: Request, *, stream: bool) -> Any:
    if stream:
        # Starlette cancels this generator when the client goes away; the cancellation
        # reaches vLLM's generate(), which aborts the request in the engine.
        return StreamingResponse(
            serving.stream(p), media_type="text/event-stream", headers=_headers(p)
        )
    body = await _until_disconnect(serving.complete(p), request)
    return JSONResponse(body, headers=_headers(p))


async def _until_disconnect(work: Any, request: Request) -> Any:
    """Await `work`, cancelling it (and so aborting it in the engine) if the client leaves.

    Non-streaming responses are not cancelled by the server on disconnect, so without
    this an abandoned request would keep burning engine time until its last token.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()
