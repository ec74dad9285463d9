"""Requests in, engine out: resolve the model, build the prompt, run, format JSON or SSE."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from adapters_registry.records import TenantRecord
from server.adapters import AdapterRouter, Target
from server.engine.base import ChoiceDelta, Engine, SamplingSpec, TokenLogprob
from server.errors import ContextLengthExceeded, InvalidRequest, describe
from server.metrics import RequestInfo
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.quotas import Quotas, Ticket

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class Caller:
    """Who a request is for: the tenant (quotas, access) and the end user (A/B arm)."""

    tenant: TenantRecord | None = None
    user: str | None = None

    @property
    def tenant_name(self) -> str | None:
        return None if self.tenant is None else self.tenant.name


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    kind: Kind
    request_id: str
    target: Target
    prompt_ids: list[int]
    sampling: SamplingSpec
    include_usage: bool
    return_token_ids: bool
    ticket: Ticket | None = None  # the quota admission; released by the middleware
    info: RequestInfo | None = None  # metrics and the request log line
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.request_id}"


@dataclass
class _Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


class Serving:
    def __init__(
        self, router: AdapterRouter, engine: Engine, quotas: Quotas, max_tokens_cap: int
    ) -> None:
        self._router = router
        self._engine = engine
        self._quotas = quotas
        self._max_tokens_cap = max_tokens_cap

    # -- preparation -------------------------------------------------------------------

    async def prepare_chat(
        self, req: ChatCompletionRequest, request_id: str, caller: Caller
    ) -> Prepared:
        target = await self._router.resolve(req.model, caller.user, caller.tenant_name)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt_ids = self._engine.tokenizer.encode(self._engine.tokenizer.render_chat(messages))
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        return self._admit(
            caller,
            Prepared(
                kind="chat",
                request_id=request_id,
                target=target,
                prompt_ids=prompt_ids,
                sampling=self._sampling(
                    req, prompt_ids, max_tokens, param, top if req.logprobs else None
                ),
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
                return_token_ids=req.return_token_ids,
            ),
        )

    async def prepare_completion(
        self, req: CompletionRequest, request_id: str, caller: Caller
    ) -> Prepared:
        if req.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        if req.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        target = await self._router.resolve(req.model, caller.user, caller.tenant_name)
        if isinstance(req.prompt, str):
            prompt_ids = self._engine.tokenizer.encode(req.prompt)
        elif all(isinstance(p, str) for p in req.prompt):
            prompt_ids = self._engine.tokenizer.encode(str(req.prompt[0]))
        else:
            prompt_ids = [int(t) for t in req.prompt]
        if not prompt_ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return self._admit(
            caller,
            Prepared(
                kind="completion",
                request_id=request_id,
                target=target,
                prompt_ids=prompt_ids,
                sampling=self._sampling(
                    req, prompt_ids, req.max_tokens, "max_tokens", req.logprobs
                ),
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
                return_token_ids=req.return_token_ids,
            ),
        )

    def _admit(self, caller: Caller, p: Prepared) -> Prepared:
        """Quotas last: only a request that is otherwise valid spends any."""
        estimate = len(p.prompt_ids) + p.sampling.n * p.sampling.max_tokens
        p.ticket = self._quotas.admit(caller.tenant, estimate)
        return p

    def _sampling(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        prompt_ids: list[int],
        max_tokens: int | None,
        param: str,
        logprobs: int | None,
    ) -> SamplingSpec:
        context = self._engine.max_model_len
        room = context - len(prompt_ids)
        if max_tokens is not None and max_tokens > self._max_tokens_cap:
            raise InvalidRequest(
                f"{param} is {max_tokens}, above this server's cap of {self._max_tokens_cap}",
                param=param,
            )
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = max_tokens if max_tokens is not None else 1
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the "
                f"prompt, {asked} for the completion). Please reduce the length of the "
                "prompt or the completion.",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            )
        return SamplingSpec(
            max_tokens=max_tokens if max_tokens is not None else min(room, self._max_tokens_cap),
            n=req.n,
            temperature=req.temperature if req.temperature is not None else 1.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            stop=req.stop_list(),
            seed=req.seed,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
        )

    # -- running -----------------------------------------------------------------------

    async def complete(self, p: Prepared) -> dict[str, Any]:
        """Run to the end and return the whole response body."""
        choices = {i: _Choice(index=i) for i in range(p.sampling.n)}
        prompt_tokens = len(p.prompt_ids)
        async for deltas in self._run(p):
            for delta in deltas:
                _accumulate(choices[delta.index], delta)
        completion_tokens = sum(len(c.token_ids) for c in choices.values())
        body: dict[str, Any] = self._envelope(p, final=True)
        body["choices"] = [self._choice(p, c, final=True) for c in choices.values()]
        body["usage"] = _usage(prompt_tokens, completion_tokens)
        if p.return_token_ids:
            body["prompt_token_ids"] = p.prompt_ids
        return body

    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        """SSE frames: chunks, then an optional usage chunk, then [DONE].

        An error after the first byte cannot change the status any more: it goes out as
        an error frame, then [DONE], so clients stop waiting.
        """
        completion_tokens = 0
        try:
            if p.kind == "chat":
                # OpenAI opens every chat stream with the role.
                for i in range(p.sampling.n):
                    yield self._frame(
                        p,
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    )
            async for deltas in self._run(p):
                out = []
                for delta in deltas:
                    completion_tokens += len(delta.token_ids)
                    if delta.text or delta.finish_reason or delta.token_ids:
                        out.append(self._choice(p, _from_delta(delta), final=False))
                if out:
                    yield self._frame(p, out)
            if p.include_usage:
                frame = self._envelope(p, final=False)
                frame["choices"] = []
                frame["usage"] = _usage(len(p.prompt_ids), completion_tokens)
                yield _sse(frame)
        except Exception as exc:
            _, body = describe(exc)
            yield _sse(body)
        yield "data: [DONE]\n\n"

    async def _run(self, p: Prepared) -> AsyncIterator[list[ChoiceDelta]]:
        """The engine's deltas for `p`, holding its adapter version for the whole run."""
        used = 0
        priority = p.ticket.priority if p.ticket is not None else 0
        info = p.info
        try:
            async with self._router.lease(p.target) as lora:
                async for chunk in self._engine.generate(
                    p.request_id, p.prompt_ids, p.sampling, lora, priority=priority
                ):
                    if info is not None and info.ttft_s is None:
                        info.ttft_s = time.perf_counter() - info.started
                    used += sum(len(d.token_ids) for d in chunk.choices)
                    yield chunk.choices
        finally:
            if p.ticket is not None:
                p.ticket.used_tokens = len(p.prompt_ids) + used
            if info is not None:
                info.completion_tokens = used

    # -- formatting --------------------------------------------------------------------

    def _envelope(self, p: Prepared, *, final: bool) -> dict[str, Any]:
        if p.kind == "chat":
            obj = "chat.completion" if final else "chat.completion.chunk"
        else:
            obj = "text_completion"
        return {"id": p.response_id, "object": obj, "created": p.created, "model": p.target.model}

    def _frame(self, p: Prepared, choices: list[dict[str, Any]]) -> str:
        frame = self._envelope(p, final=False)
        frame["choices"] = choices
        if p.include_usage:
            frame["usage"] = None
        return _sse(frame)

    def _choice(self, p: Prepared, c: _Choice, *, final: bool) -> dict[str, Any]:
        finish = _finish_reason(c.finish_reason)
        out: dict[str, Any]
        if p.kind == "chat":
            content_key = "message" if final else "delta"
            message: dict[str, Any] = {"content": c.text}
            if final:
                message = {"role": "assistant", "content": c.text}
            out = {
                "index": c.index,
                content_key: message,
                "logprobs": _chat_logprobs(c.logprobs),
                "finish_reason": finish,
            }
        else:
            out = {
                "index": c.index,
                "text": c.text,
                "logprobs": _completion_logprobs(c.logprobs),
                "finish_reason": finish,
            }
        if p.return_token_ids:
            out["token_ids"] = c.token_ids
        return out


def _accumulate(choice: _Choice, delta: ChoiceDelta) -> None:
    choice.text += delta.text
    choice.token_ids.extend(delta.token_ids)
    if delta.logprobs is not None:
        choice.logprobs = (choice.logprobs or []) + delta.logprobs
    if delta.finish_reason is not None:
        choice.finish_reason = delta.finish_reason


def _from_delta(delta: ChoiceDelta) -> _Choice:
    return _Choice(
        index=delta.index,
        text=delta.text,
        token_ids=delta.token_ids,
        logprobs=delta.logprobs,
        finish_reason=delta.finish_reason,
    )


def _finish_reason(reason: str | None) -> str | None:
    # vLLM says "abort" when a request is cancelled; OpenAI clients know stop/length.
    return None if reason is None else ("length" if reason == "length" else "stop")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top
                ],
            }
            for lp in lps
        ]
    }


def _completion_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    offsets, pos = [], 0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [dict(lp.top) for lp in lps],
        "text_offset": offsets,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
