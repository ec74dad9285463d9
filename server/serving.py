"""The layer around vLLM's OpenAI layer: who may run what, on which adapter version.

For each inference request, in this order, so that nothing expensive happens for a
request that will be refused:

1. our caps on parameters (max_tokens, n, stop strings, prompts per request) and the
   parameters that cannot take effect here (400 naming them, never silently dropped);
2. the model name resolved to base / adapter version / alias arm, with tenant access
   (a private name of another tenant is the 404 of a name that does not exist), and
   that version's serving defaults filled in for the fields the request did not send;
3. admission: the server's bound on requests in flight, the tenant's concurrency and
   token quota (the prompt's tokens are reserved once vLLM has tokenized them, still
   before the engine sees the request: server/engine/openai_layer.py);
4. the adapter version leased, loaded into the engine if needed;
5. vLLM's serving object, which renders, tokenizes, runs and formats the response.

Everything taken is given back when the response has fully gone (finalizers run by
server/lifecycle.py), whatever happened to it. A request through an alias with a shadow
may be sampled to run again on the shadow adapter after that (server/experiments/shadow.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapters_registry.experiments import ShadowConfig
from adapters_registry.records import ServingDefaults, TenantRecord
from server.adapters import AdapterRouter, Lease, Target
from server.engine.openai_layer import (
    Answer,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAILayer,
    RequestScope,
    ResponsesRequest,
    ShadowCapture,
    Usage,
)
from server.errors import InvalidDefaults, InvalidRequest
from server.experiments.shadow import Shadows
from server.metrics import RequestInfo
from server.quotas import Admission, Admitted

_MAX_N = 16  # choices per request (and prompts per completion request)
_MAX_STOP = 4  # stop strings, as OpenAI
_DISCONNECT_POLL_S = 0.2
# vLLM reads these headers to override a request's scheduling; here the server decides.
_REFUSED_HEADERS = ("x-vllm-priority", "x-data-parallel-rank")
# The response header naming the serving defaults a request got (README: Adapters).
DEFAULTS_HEADER = "x-adapter-defaults"
# The request fields that, sent, make a serving default the request's own (the first one
# the request type has is the one a default fills); any other default fills its namesake.
_DEFAULT_FIELDS = {"max_tokens": ("max_tokens", "max_completion_tokens", "max_output_tokens")}
# Roles that set a conversation's instructions: with one, no system prompt is added.
_SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True)
class Caller:
    """Who a request is for: the tenant (quotas, access) and the end user (A/B arm)."""

    tenant: TenantRecord | None = None
    user: str | None = None

    @property
    def tenant_name(self) -> str | None:
        return None if self.tenant is None else self.tenant.name


def _get(body: Any, name: str) -> Any:
    # The field's value as parsed (vars: no deprecation warning for max_tokens).
    return vars(body).get(name)


class Gateway:
    def __init__(
        self, router: AdapterRouter, layer: OpenAILayer, quotas: Admission, max_tokens_cap: int
    ) -> None:
        self._router = router
        self._layer = layer
        self._quotas = quotas
        self._max_tokens_cap = max_tokens_cap
        self.shadows: Shadows | None = None  # set once the exposure log is up (app.py)

    @property
    def layer(self) -> OpenAILayer:
        return self._layer

    async def serve(
        self,
        body: Any,
        request: Request,
        caller: Caller,
        run: Callable[[Any, Request], Awaitable[Answer]],
    ) -> Response:
        """Check, resolve, admit, lease, then `run` (one of the layer's handlers)."""
        self._check(body, request)
        target = await self._router.resolve(
            body.model or self._router.base_name, caller.user, caller.tenant_name
        )
        applied = self._apply_defaults(body, target)
        info: RequestInfo | None = getattr(request.state, "info", None)
        if info is not None:
            _describe(info, target, caller, _response_id(body, request))
        ticket = await self._quotas.enter(caller.tenant, self._known_tokens(body))
        finish = _Finish(ticket, info, caller.tenant_name, self._shadow_of(body, target, info))
        # Run by the middleware once the response is over; finish before the ticket's
        # release, so that the refund is known.
        request.state.finalizers = [finish, ticket.release]
        finish.lease = lease = await self._router.acquire(target)
        scope = RequestScope(
            model=target.model,
            lora=lease.handle,
            priority=ticket.priority,
            max_tokens_cap=self._max_tokens_cap,
            requested_max_tokens=_requested_max_tokens(body),
            reserve=ticket.reserve,
            usage=finish.usage,
            shadow=finish.capture,
        )
        self._layer.enter(scope)
        answer = await _until_disconnect(run(body, _for_vllm(request)), request)
        headers = _headers(target, applied)
        if answer.stream is not None:
            # Starlette cancels the stream when the client goes away; the cancellation
            # reaches vLLM's generate(), which aborts the request in the engine.
            return StreamingResponse(answer.stream, media_type="text/event-stream", headers=headers)
        return JSONResponse(answer.body, headers=headers)

    def _shadow_of(
        self, body: Any, target: Target, info: RequestInfo | None
    ) -> tuple[Shadows, ShadowConfig] | None:
        """The shadow this admitted request is sampled to run on too, if any."""
        shadows = self.shadows
        if shadows is None:
            return None
        shadows.pressure()  # past its bound of load, this request aborts shadows
        if target.alias is None or info is None or _get(body, "use_beam_search"):
            return None
        config = shadows.sample(target.alias)
        return None if config is None else (shadows, config)

    # -- checks ----------------------------------------------------------------------

    def _check(self, body: Any, request: Request) -> None:
        """Our caps, and what vLLM would accept but not honour here: a 400 naming it."""
        self._check_body(body)
        for header in _REFUSED_HEADERS:
            if header in request.headers:
                raise InvalidRequest(f"the {header} header is not accepted by this server")

    def _check_body(self, body: Any) -> None:
        # vLLM accepts unknown fields and only logs them; OpenAI refuses them, and a
        # parameter that silently does nothing is worse than a 400.
        extra = sorted(getattr(body, "model_extra", None) or ())
        if extra:
            raise InvalidRequest(
                f"unrecognized request argument(s): {', '.join(extra)}", param=extra[0]
            )
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = _get(body, name)
            if value is not None and value > self._max_tokens_cap:
                raise InvalidRequest(
                    f"{name} is {value}, above this server's cap of {self._max_tokens_cap}",
                    param=name,
                )
        n = _get(body, "n")
        if n is not None and n > _MAX_N:
            raise InvalidRequest(f"n is {n}, above this server's cap of {_MAX_N}", param="n")
        stop = _get(body, "stop")
        if isinstance(stop, list) and len(stop) > _MAX_STOP:
            raise InvalidRequest(f"at most {_MAX_STOP} stop strings", param="stop")
        prompt = _get(body, "prompt")
        if isinstance(prompt, list) and len(prompt) > _MAX_N and isinstance(prompt[0], (str, list)):
            raise InvalidRequest(f"at most {_MAX_N} prompts per request", param="prompt")
        if _get(body, "priority"):
            raise InvalidRequest(
                "priority is set by this server (tenant fairness), not by requests",
                param="priority",
            )
        if _get(body, "store") and "store" in body.model_fields_set:
            # OpenAI's default is true, so vLLM drops an implicit one; an explicit one
            # asks for something this server does not do (responses are not kept).
            raise InvalidRequest(
                "store: this server keeps no responses (vLLM's response store is off)",
                param="store",
            )
        if _get(body, "kv_transfer_params"):
            raise InvalidRequest(
                "kv_transfer_params: this server has no KV connector", param="kv_transfer_params"
            )

    # -- serving defaults ----------------------------------------------------------------

    def parse_defaults(self, raw: dict[str, Any] | None) -> ServingDefaults | None:
        """A version's serving defaults as registration gives them, checked as the same
        fields of a request are (vLLM's request model and bounds, then our caps): what
        is registered is what every request can be given. None for none; raises
        InvalidDefaults (400) naming the field, before anything is registered."""
        values = {k: v for k, v in (raw or {}).items() if v is not None}
        if not values:
            return None
        known = ServingDefaults.names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidDefaults(
                f"unknown serving default(s): {', '.join(unknown)}; known: {', '.join(known)}",
                param=f"defaults.{unknown[0]}",
            )
        prompt = values.get("system_prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidDefaults("system_prompt must be a string", param="defaults.system_prompt")
        try:
            req = self._layer.check_defaults(values)
            self._check_body(req)
        except InvalidRequest as exc:
            where = "defaults" if exc.param is None else f"defaults.{exc.param}"
            raise InvalidDefaults(f"{where}: {exc.message}", param=where) from None
        parsed: dict[str, Any] = {k: _get(req, k) for k in values if k != "system_prompt"}
        if isinstance(parsed.get("stop"), list):
            parsed["stop"] = tuple(parsed["stop"])
        return ServingDefaults(system_prompt=prompt, **parsed)

    def _apply_defaults(self, body: Any, target: Target) -> list[str]:
        """Fill in the resolved version's serving defaults for what the request did not
        send (a field sent explicitly is the request's own, even if equal to the
        default); the names of those applied. Generation requests only: /tokenize and
        /detokenize count what they are given."""
        defaults = None if target.version is None else target.version.defaults
        if defaults is None or not isinstance(
            body, (ChatCompletionRequest, CompletionRequest, ResponsesRequest)
        ):
            return []
        applied = []
        for name, value in defaults.as_dict().items():
            if name == "system_prompt":
                if _add_system_prompt(body, value):
                    applied.append(name)
                continue
            fields = [f for f in _DEFAULT_FIELDS.get(name, (name,)) if f in type(body).model_fields]
            if not fields or body.model_fields_set.intersection(fields):
                continue
            if name == "max_tokens":
                # The cap may have been lowered since registration: a default is capped,
                # as vLLM's own default is, rather than refused.
                value = min(value, self._max_tokens_cap)
            setattr(body, fields[0], value)
            applied.append(name)
        return applied

    def _known_tokens(self, body: Any) -> int:
        """Tokens known to be needed before tokenizing: n * max_tokens, when given."""
        return int((_get(body, "n") or 1) * (_requested_max_tokens(body) or 0))


class _Finish:
    """What is given back once a request is over, whatever ended it (a failed load, a
    client gone before the first token, the last token): run by the middleware."""

    def __init__(
        self,
        ticket: Admitted,
        info: RequestInfo | None,
        tenant: str | None,
        shadow: tuple[Shadows, ShadowConfig] | None,
    ) -> None:
        self._ticket = ticket
        self._info = info
        self._tenant = tenant
        self._shadow = shadow
        self.usage = Usage()  # filled in by vLLM's layer as the request runs
        self.capture = ShadowCapture() if shadow is not None else None
        self.lease: Lease | None = None  # once acquired

    def __call__(self) -> None:
        # The quota learns what was really used: a request that never reached the engine
        # gives its whole reservation back (review L1).
        usage = self.usage
        self._ticket.used_tokens = usage.prompt_tokens + usage.completion_tokens
        info = self._info
        if info is not None:
            info.prompt_tokens = usage.prompt_tokens
            info.completion_tokens = usage.completion_tokens
            if usage.first_token_at is not None:
                info.ttft_s = usage.first_token_at - info.started
        if self.lease is not None:
            self.lease.release()
        if self._shadow is not None:
            assert info is not None
            assert self.capture is not None
            shadows, config = self._shadow
            # Once the response's exposure is queued (after the finalizers).
            asyncio.get_running_loop().call_soon(
                shadows.submit, config, info, self._tenant, self.capture
            )


def _requested_max_tokens(body: Any) -> int | None:
    value = (
        _get(body, "max_completion_tokens")
        or _get(body, "max_tokens")
        or _get(body, "max_output_tokens")
    )
    return None if value is None else int(value)


def caller_of(tenant: TenantRecord | None, body: Any, request: Request) -> Caller:
    """Who the request is for, for sticky A/B assignment: `user`, else `x-user-id`."""
    user = _get(body, "user") or request.headers.get("x-user-id") or None
    return Caller(tenant=tenant, user=user)


def _describe(info: RequestInfo, target: Target, caller: Caller, response_id: str) -> None:
    """Tell the request's log line and metrics what serves it; through an alias, also
    what its exposure row needs (written when the request is over: server/experiments)."""
    info.model = target.model
    info.tenant = caller.tenant_name or ""
    if target.version is not None:
        info.adapter = target.version.adapter
        info.version = str(target.version.version)
        if target.alias is not None:
            info.alias = target.alias
            info.response_id = response_id
            info.exposure_id = uuid.uuid4().hex
            info.digest = target.version.content_digest
            # Never the user itself: the exposure log is joined on it, not read for it.
            info.user_hash = hashlib.sha256(caller.user.encode()).hexdigest() if caller.user else ""
    info.variant = target.variant or ""


# The id vLLM gives a response: a prefix and the request id we hand it (see _for_vllm);
# the Responses API names its responses by the body's `request_id` instead.
_RESPONSE_ID_PREFIX = {"/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-"}


def _response_id(body: Any, request: Request) -> str:
    """The id of the response this request gets ("" for tokenize/detokenize: none)."""
    route = getattr(request.scope.get("route"), "path", "")
    if route == "/v1/responses":
        return str(_get(body, "request_id") or "")
    prefix = _RESPONSE_ID_PREFIX.get(route)
    return "" if prefix is None else prefix + str(request.state.request_id)


def _add_system_prompt(body: Any, prompt: str) -> bool:
    """Give the conversation `prompt` as its instructions unless it has some already
    (a system or developer message; the Responses API's `instructions`). A completion
    prompt is raw text: it gets none."""
    if isinstance(body, ChatCompletionRequest):
        if any(_role(m) in _SYSTEM_ROLES for m in body.messages):
            return False
        body.messages.insert(0, {"role": "system", "content": prompt})
        return True
    if isinstance(body, ResponsesRequest):
        items = body.input if isinstance(body.input, list) else []
        if body.instructions is not None or any(_role(i) in _SYSTEM_ROLES for i in items):
            return False
        body.instructions = prompt
        return True
    return False


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else getattr(message, "role", None)


def _headers(target: Target, applied: list[str]) -> dict[str, str]:
    """Every response says what served it (x-request-id is added by the middleware)."""
    headers = {}
    if target.version is not None:
        headers["x-adapter"] = target.version.adapter
        headers["x-adapter-version"] = str(target.version.version)
    if applied:
        headers[DEFAULTS_HEADER] = ",".join(applied)
    if target.alias is not None and target.variant is not None:
        headers["x-alias"] = target.alias
        headers["x-alias-variant"] = target.variant
    return headers


def _for_vllm(request: Request) -> Request:
    """The request as vLLM's serving objects see it: its id is ours (validated, or made
    up by the middleware), not whatever x-request-id the client sent."""
    request_id: str = request.state.request_id
    headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"x-request-id",)]
    headers.append((b"x-request-id", request_id.encode()))
    return Request({**request.scope, "headers": headers}, request.receive)


async def _until_disconnect(work: Awaitable[Answer], request: Request) -> Answer:
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
