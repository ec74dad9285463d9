"""OpenAI-compatible routes. Thin: parse, hand to Serving, choose JSON or SSE."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.deps import RequestIdDep, RouterDep, ServingDep
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import Prepared, Serving

router = APIRouter(prefix="/v1", tags=["openai"])

_DISCONNECT_POLL_S = 0.2


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: ServingDep, request_id: RequestIdDep
) -> Any:
    prepared = await serving.prepare_chat(body, request_id)
    return await _respond(serving, prepared, request, stream=body.stream)


@router.post("/completions", summary="Text completion (OpenAI-compatible)")
async def completions(
    body: CompletionRequest, request: Request, serving: ServingDep, request_id: RequestIdDep
) -> Any:
    prepared = await serving.prepare_completion(body, request_id)
    return await _respond(serving, prepared, request, stream=body.stream)


@router.get("/models", summary="The base model and every adapter")
async def list_models(router_: RouterDep) -> dict[str, Any]:
    base = router_.base_name
    data: list[dict[str, Any]] = [
        {
            "id": base,
            "object": "model",
            "created": 0,
            "owned_by": "loraswap",
            "root": base,
            "parent": None,
        }
    ]
    for name in router_.adapter_names():
        data.append(
            {
                "id": f"{base}:{name}",
                "object": "model",
                "created": 0,
                "owned_by": "loraswap",
                "root": base,
                "parent": base,
            }
        )
    return {"object": "list", "data": data}


def _headers(p: Prepared) -> dict[str, str]:
    headers = {"x-request-id": p.request_id}
    if p.target.adapter is not None:
        headers["x-adapter"] = p.target.adapter.name
        headers["x-adapter-version"] = p.target.adapter.sha256[:12]
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
