"""OpenAI-compatible routes. Thin: the body is vLLM's own request model, the Gateway
(server/serving.py) decides who runs what, vLLM's OpenAI layer does the rest."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.deps import GatewayDep, PrincipalDep, RouterDep
from server.engine.openai_layer import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from server.errors import ModelNotFound
from server.serving import caller_of

router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, gateway: GatewayDep, principal: PrincipalDep
) -> Response:
    caller = caller_of(principal.tenant, body, request)
    return await gateway.serve(body, request, caller, gateway.layer.create_chat)


@router.post("/v1/completions", summary="Text completion (OpenAI-compatible)")
async def completions(
    body: CompletionRequest, request: Request, gateway: GatewayDep, principal: PrincipalDep
) -> Response:
    caller = caller_of(principal.tenant, body, request)
    return await gateway.serve(body, request, caller, gateway.layer.create_completion)


@router.post("/v1/responses", summary="Responses API (OpenAI-compatible)")
async def responses(
    body: ResponsesRequest, request: Request, gateway: GatewayDep, principal: PrincipalDep
) -> Response:
    caller = caller_of(principal.tenant, body, request)
    return await gateway.serve(body, request, caller, gateway.layer.create_response)


@router.post("/tokenize", summary="Tokenize a prompt or conversation (vLLM extension)")
async def tokenize(
    body: TokenizeRequest, request: Request, gateway: GatewayDep, principal: PrincipalDep
) -> Response:
    caller = caller_of(principal.tenant, body, request)
    return await gateway.serve(body, request, caller, gateway.layer.tokenize)


@router.post("/detokenize", summary="Token ids back to text (vLLM extension)")
async def detokenize(
    body: DetokenizeRequest, request: Request, gateway: GatewayDep, principal: PrincipalDep
) -> Response:
    caller = caller_of(principal.tenant, body, request)
    return await gateway.serve(body, request, caller, gateway.layer.detokenize)


@router.get("/v1/models", summary="The base model, every adapter and every alias")
async def list_models(router_: RouterDep, gateway: GatewayDep, principal: PrincipalDep) -> Response:
    # The whole list, as OpenAI's /v1/models (no paging there); encoded once per registry
    # change and tenant: 1.1 MB at 10,000 adapters, served again as the same bytes.
    base = router_.base_name

    def render(adapters: list[str], aliases: list[str]) -> bytes:
        names: list[tuple[str, str | None, str | None]] = [(base, None, None)]
        names += [(f"{base}:{name}", base, None) for name in adapters]
        names += [(f"{base}:{name}", base, "alias") for name in aliases]
        listing = gateway.layer.model_list(names).model_dump()
        # As JSONResponse encodes.
        return json.dumps(
            listing, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()

    body = await router_.models_body(principal.tenant_name, render)
    return Response(body, media_type="application/json")


@router.get("/v1/models/{model:path}", summary="One model, adapter or alias")
async def retrieve_model(
    model: str, router_: RouterDep, gateway: GatewayDep, principal: PrincipalDep
) -> Response:
    base = router_.base_name
    name = router_.split(model)
    if name is None:
        card = gateway.layer.model_card(base, None, None)
    else:
        adapters, aliases = await router_.model_names(principal.tenant_name)
        if name in aliases:
            card = gateway.layer.model_card(f"{base}:{name}", base, "alias")
        elif name in adapters:
            card = gateway.layer.model_card(f"{base}:{name}", base, None)
        else:
            raise ModelNotFound(f"The model '{model}' does not exist", param="model")
    return JSONResponse(card.model_dump())
