"""vLLM's own OpenAI layer, created once over our engine, with our routing at its seams.

vLLM does the protocol: request models, chat templates, tools and tool parsers,
structured outputs, sampling parameters, response and SSE formatting (chat, completions,
Responses, tokenize). We own three seams, all set per request through `RequestScope`:

- which adapter version serves it: `_maybe_get_adapters`, the one place where vLLM's
  serving objects turn `request.model` into a LoRARequest, returns the version our
  resolver chose (and `_check_model` trusts that resolution);
- the `model` named in every response and stream chunk: `models.model_name`;
- what reaches the engine: `engine_client.generate` is wrapped to put the tenant's
  priority (never the client's), reserve the prompt's tokens against the tenant's quota
  once vLLM has tokenized it and before the engine sees it, clamp a defaulted
  `max_tokens` to our cap, give each engine request a unique id, and count tokens; for a
  request sampled for shadow traffic, also to keep its engine input and output, so that
  the same input can run again on the shadow adapter (`OpenAILayer.run_shadow`).

Together with server/engine/vllm.py this is the only code that imports vLLM.
"""

from __future__ import annotations

import itertools
import json
import time
from argparse import Namespace
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import Request
from pydantic import ValidationError, ValidatorFunctionWrapHandler, model_validator
from vllm.entrypoints.launchers.cli_args import (
    make_arg_parser,
    resolve_default_chat_template_kwargs,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as _CompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionResponse
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels

# The Responses API's SSE framing, as vLLM's own route does it.
from vllm.entrypoints.openai.responses.api_router import _convert_stream_to_sse_events
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
from vllm.entrypoints.serve.engine.protocol import (
    ErrorResponse,
    ModelCard,
    ModelList,
)
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
from vllm.exceptions import VLLMError, VLLMValidationError
from vllm.renderers.chat_utils import load_chat_template
from vllm.renderers.inputs.preprocess import extract_prompt_len
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.sampling_params import RequestOutputKind, SamplingParams, SamplingType
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.exceptions import EngineDeadError

from server.engine.base import LoraHandle
from server.engine.vllm import lora_request
from server.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    NotImplementedByEngine,
    RateLimited,
    RequestTooLarge,
    ServerError,
    describe,
)
from server.settings import Settings

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "DetokenizeRequest",
    "OpenAILayer",
    "RequestScope",
    "ResponsesRequest",
    "ShadowCapture",
    "ShadowOutput",
    "TokenizeRequest",
    "VLLMError",
    "as_server_error",
    "vllm_args",
]


class CompletionRequest(_CompletionRequest):
    """vLLM's, except that `model_fields_set` says whether the client sent max_tokens:
    vLLM's own validator writes OpenAI's default (16) into the request's data, so the
    field looks sent; a version's serving default (server/serving.py) must tell."""

    @model_validator(mode="wrap")
    @classmethod
    def _max_tokens_sent(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        sent = isinstance(data, dict) and data.get("max_tokens") is not None
        request = handler(data)
        if not sent:
            request.model_fields_set.discard("max_tokens")
        return request


# Parameters that vLLM's context-length checks name (VLLMValidationError.parameter).
_CONTEXT_PARAMS = frozenset({"input_tokens", "input_text"})


def vllm_args(settings: Settings) -> Namespace:
    """`vllm serve`'s own arguments for our settings: the engine and the OpenAI layer
    read the same Namespace, parsed by vLLM's parser, so every default is vLLM's."""
    if settings.model is None:
        raise ValueError("settings.model is required")
    e, o = settings.engine, settings.openai
    argv = [
        "--model", str(settings.model),
        "--served-model-name", settings.served_model_name,
        "--dtype", e.dtype,
        "--max-model-len", str(e.max_model_len),
        "--max-num-seqs", str(e.max_num_seqs),
        "--enable-lora",
        "--max-loras", str(e.max_loras),
        "--max-cpu-loras", str(max(e.max_cpu_loras, e.max_loras)),
        "--max-lora-rank", str(e.max_lora_rank),
        "--scheduling-policy", e.scheduling_policy,
        "--disable-log-stats",
        "--structured-outputs-config.backend", o.structured_outputs_backend,
    ]  # fmt: skip
    if o.structured_outputs_disable_any_whitespace:
        argv += ["--structured-outputs-config.disable_any_whitespace", "true"]
    if e.enforce_eager:
        argv.append("--enforce-eager")
    if e.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(e.tensor_parallel_size)]
    if o.chat_template is not None:
        argv += ["--chat-template", o.chat_template]
    if o.tool_call_parser is not None:
        argv += ["--tool-call-parser", o.tool_call_parser]
    if o.enable_auto_tool_choice:
        argv.append("--enable-auto-tool-choice")
    parser: Any = make_arg_parser(FlexibleArgumentParser(prog="loraswap"))  # type: ignore[no-untyped-call]
    args: Namespace = parser.parse_args(argv)
    return args


@dataclass
class Usage:
    """What the engine did for one request, read when its response ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # perf_counter; streaming responses only


@dataclass
class ShadowCapture:
    """The first engine request of a request sampled for shadow traffic: its engine input
    and sampling parameters, kept to run them again on the shadow, and its own output."""

    prompt: Any = None
    params: Any = None  # a copy of the SamplingParams, taken before the engine saw them
    kwargs: dict[str, Any] = field(default_factory=dict)
    greedy: bool = False
    tokens: dict[int, list[int]] = field(default_factory=dict)  # per choice
    started: float = 0.0
    latency_s: float | None = None  # set once the engine finished it

    @property
    def complete(self) -> bool:
        return self.params is not None and self.latency_s is not None

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())


@dataclass(frozen=True)
class ShadowOutput:
    tokens: dict[int, list[int]]
    latency_s: float

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())


@dataclass
class RequestScope:
    """Our decisions for one request, visible to vLLM's serving objects at the seams."""

    model: str  # what the client asked for, canonicalised: every response names it
    lora: LoraHandle | None
    priority: int = 0
    max_tokens_cap: int = 4096
    # The max_tokens the client asked for (None: vLLM's default, capped): a prompt that
    # leaves less room than that is a 400, as OpenAI answers (vLLM would cut it short).
    requested_max_tokens: int | None = None
    # Takes the request's total token reservation (prompt + n * max_tokens, once the
    # prompt is tokenized); raises RateLimited/InvalidRequest to refuse it.
    reserve: Callable[[int], None] = lambda _total: None
    usage: Usage = field(default_factory=Usage)
    # Set for a request sampled for shadow traffic: filled by its first engine request.
    shadow: ShadowCapture | None = None
    _lora_request: Any = None
    _reserved: int = 0

    @property
    def lora_request(self) -> Any:
        if self.lora is not None and self._lora_request is None:
            self._lora_request = lora_request(self.lora)
        return self._lora_request


_SCOPE: ContextVar[RequestScope | None] = ContextVar("loraswap_request_scope", default=None)


def _scope() -> RequestScope:
    scope = _SCOPE.get()
    if scope is None:  # a code path of vLLM's that we did not route: refuse, loudly
        raise EngineFailure("request reached vLLM's OpenAI layer without routing")
    return scope


class _Routed:
    """The adapter seam, mixed into each of vLLM's serving classes."""

    request_logger: Any

    async def _check_model(self, request: Any) -> ErrorResponse | None:
        # Our resolver decided (or refused with our 404) before vLLM saw the request.
        if self.request_logger is not None:
            self.request_logger.log_request_body(request)
        return None

    def _maybe_get_adapters(self, request: Any, supports_default_mm_loras: bool = False) -> Any:
        return _scope().lora_request


class _Chat(_Routed, OpenAIServingChat):
    pass


class _Completion(_Routed, OpenAIServingCompletion):
    pass


class _Responses(_Routed, OpenAIServingResponses):
    pass


class _Tokenization(_Routed, ServingTokenization):
    pass


class _Models(OpenAIServingModels):
    """Responses name what the client asked for (canonical `base:adapter`), not the
    engine's internal LoRA name."""

    def model_name(self, lora_request: Any = None) -> str:
        scope = _SCOPE.get()
        return scope.model if scope is not None else self.base_model_paths[0].name


class _RoutedClient:
    """vLLM's EngineClient as the serving objects see it: everything delegated, but
    `generate` carries our decisions (see the module docstring)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._ids = itertools.count()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def generate(
        self,
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *,
        lora_request: Any = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> AsyncGenerator[Any, None]:
        scope = _scope()
        n, max_tokens = _cap_max_tokens(sampling_params, scope.max_tokens_cap)
        prompt_len = extract_prompt_len(self._client.model_config, prompt)
        self._check_context(prompt_len, scope.requested_max_tokens)
        # Quota before the engine sees anything: raises without side effects.
        total = scope._reserved + prompt_len + n * max_tokens
        scope.reserve(total)
        scope._reserved = total
        scope.usage.prompt_tokens += prompt_len
        capture = _capture_shadow(scope.shadow, prompt, sampling_params, kwargs)
        out = self._client.generate(
            prompt,
            sampling_params,
            # Unique per engine request: clients choose x-request-id, and two clients
            # may choose the same one.
            f"{request_id}.{next(self._ids)}",
            lora_request=scope.lora_request,
            priority=scope.priority,
            **kwargs,
        )
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        return _observe(out, scope.usage, delta=delta, capture=capture)

    def _check_context(self, prompt_len: int, asked: int | None) -> None:
        context = int(self._client.model_config.max_model_len)
        if asked is not None and prompt_len + asked > context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} "
                "for the completion). Please reduce the length of the prompt or the "
                "completion.",
                param="messages",
            )


def _cap_max_tokens(sampling_params: Any, cap: int) -> tuple[int, int]:
    """Cap an engine request's max_tokens; returns (n, max_tokens) for the quota."""
    if not isinstance(sampling_params, SamplingParams):
        return 1, 0  # beam search: its own loop calls generate again with SamplingParams
    # vLLM defaults max_tokens to the rest of the context; ours is capped.
    # (A max_tokens the client gave was checked against the cap already.)
    if sampling_params.max_tokens is None or sampling_params.max_tokens > cap:
        sampling_params.max_tokens = cap
    return sampling_params.n, sampling_params.max_tokens


def _capture_shadow(
    capture: ShadowCapture | None, prompt: Any, sampling_params: Any, kwargs: dict[str, Any]
) -> ShadowCapture | None:
    """Note what a shadow run needs of the first engine request (not of beam search)."""
    if capture is None or capture.params is not None:
        return None
    if not isinstance(sampling_params, SamplingParams):
        return None
    capture.prompt = prompt
    # Tracing and session ids belong to the client's request, not to its shadow.
    capture.kwargs = {k: v for k, v in kwargs.items() if k not in ("trace_headers", "session_id")}
    capture.params = sampling_params.clone()
    capture.greedy = sampling_params.sampling_type == SamplingType.GREEDY
    capture.started = time.perf_counter()
    return capture


async def _observe(
    outputs: AsyncIterator[Any],
    usage: Usage,
    *,
    delta: bool,
    capture: ShadowCapture | None = None,
) -> AsyncGenerator[Any, None]:
    """Pass the engine's outputs through, counting completion tokens and noting the first
    (with DELTA outputs, i.e. streaming: a final-only output arrives with the last token);
    for a shadowed request, keeping its tokens and when it finished."""
    counted: dict[int, int] = {}
    async for out in outputs:
        for c in out.outputs:
            if delta:
                counted[c.index] = counted.get(c.index, 0) + len(c.token_ids)
            else:
                counted[c.index] = len(c.token_ids)
            if capture is not None:
                if delta:
                    capture.tokens.setdefault(c.index, []).extend(c.token_ids)
                else:
                    capture.tokens[c.index] = list(c.token_ids)
        if delta and usage.first_token_at is None and any(c.token_ids for c in out.outputs):
            usage.first_token_at = time.perf_counter()
        if capture is not None and out.finished:
            capture.latency_s = time.perf_counter() - capture.started
        yield out
        usage.completion_tokens = sum(counted.values())
    usage.completion_tokens = sum(counted.values())


def _dump(obj: Any) -> dict[str, Any]:
    if isinstance(obj, ResponsesResponse):
        return dict(obj.model_dump(mode="json", by_alias=True))
    return dict(obj.model_dump())


def as_server_error(err: ErrorResponse | Exception) -> ServerError:
    """vLLM's verdict on a request, as our error (one table maps ours to HTTP)."""
    if isinstance(err, ServerError):
        return err
    if isinstance(err, EngineDeadError):
        return EngineUnavailable("the inference engine is not running")
    context = isinstance(err, VLLMValidationError) and err.parameter in _CONTEXT_PARAMS
    response = err if isinstance(err, ErrorResponse) else create_error_response(err)
    info = response.error
    if context:
        return ContextLengthExceeded(info.message, param="messages")
    cls: type[ServerError] = {
        HTTPStatus.BAD_REQUEST: InvalidRequest,
        HTTPStatus.UNPROCESSABLE_ENTITY: InvalidRequest,
        HTTPStatus.NOT_FOUND: ModelNotFound,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE: RequestTooLarge,
        HTTPStatus.TOO_MANY_REQUESTS: RateLimited,
        HTTPStatus.NOT_IMPLEMENTED: NotImplementedByEngine,
        HTTPStatus.SERVICE_UNAVAILABLE: EngineUnavailable,
    }.get(HTTPStatus(info.code), EngineFailure)
    return cls(info.message, param=info.param)


@dataclass
class Answer:
    """A handler's result: a JSON body, or SSE frames to stream."""

    body: dict[str, Any] | None = None
    stream: AsyncIterator[str] | None = None


class OpenAILayer:
    """vLLM's serving objects, created once over the engine client."""

    def __init__(self, engine_client: Any, args: Namespace, base_name: str) -> None:
        client: Any = _RoutedClient(engine_client)
        self._engine_client = engine_client
        self.max_model_len = int(engine_client.model_config.max_model_len)
        self._template = load_chat_template(args.chat_template)
        self._template_kwargs = resolve_default_chat_template_kwargs(args)
        self.models = _Models(
            engine_client=client,
            base_model_paths=[BaseModelPath(name=base_name, model_path=base_name)],
        )
        common = self._common_options(args)
        renderer = OnlineRenderer(
            model_config=engine_client.model_config,
            renderer=engine_client.renderer,
            request_logger=None,
            trust_request_mm_kwargs=args.trust_request_mm_kwargs,
            log_error_stack=args.log_error_stack,
            **common,
        )
        renderer.warmup()
        self._renderer = renderer
        self._trust_request_chat_template = bool(args.trust_request_chat_template)
        self._make_serving(client, args, common)

    def _common_options(self, args: Namespace) -> dict[str, Any]:
        """The options vLLM's renderer and chat/responses serving objects share."""
        return dict(
            chat_template=self._template,
            chat_template_content_format=args.chat_template_content_format,
            trust_request_chat_template=args.trust_request_chat_template,
            enable_auto_tools=args.enable_auto_tool_choice,
            exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
            tool_parser=args.tool_call_parser,
            tool_strict_level=args.tool_strict_level,
            reasoning_parser=args.structured_outputs_config.reasoning_parser,
            default_chat_template_kwargs=self._template_kwargs,
        )

    def _make_serving(self, client: Any, args: Namespace, common: dict[str, Any]) -> None:
        """vLLM's serving objects, one per API family, over our routed client."""
        renderer = self._renderer
        outputs: dict[str, Any] = dict(
            return_tokens_as_token_ids=args.return_tokens_as_token_ids,
            enable_prompt_tokens_details=args.enable_prompt_tokens_details,
            enable_force_include_usage=args.enable_force_include_usage,
            enable_per_request_metrics=args.enable_per_request_metrics,
        )
        self.chat = _Chat(
            engine_client=client,
            models=self.models,
            response_role=args.response_role,
            online_renderer=renderer,
            request_logger=None,
            enable_log_outputs=False,
            enable_log_deltas=False,
            **common,
            **outputs,
        )
        self.completion = _Completion(
            client, self.models, online_renderer=renderer, request_logger=None, **outputs
        )
        # vLLM's responses serving takes neither of these two options.
        responses_kwargs = {
            k: v
            for k, v in common.items()
            if k not in ("trust_request_chat_template", "exclude_tools_when_tool_choice_none")
        }
        self.responses = _Responses(
            client,
            self.models,
            renderer,
            request_logger=None,
            tool_server=None,
            enable_log_outputs=False,
            **responses_kwargs,
            **outputs,
        )
        self.tokenization = _Tokenization(
            self.models,
            renderer,
            request_logger=None,
            chat_template=self._template,
            chat_template_content_format=args.chat_template_content_format,
            default_chat_template_kwargs=self._template_kwargs,
            trust_request_chat_template=args.trust_request_chat_template,
        )

    def check_defaults(self, values: dict[str, Any]) -> ChatCompletionRequest:
        """A version's serving defaults (`system_prompt` and request fields), checked as
        vLLM checks a request's own fields: its request model (types), its sampling
        parameters' bounds, its per-request chat template policy. The chat request they
        make is returned: its fields are the values as vLLM parsed them, and our own
        caps are checked on it (server/serving.py). Raises InvalidRequest naming the field.
        """
        fields = {k: v for k, v in values.items() if k != "system_prompt"}
        messages: list[dict[str, Any]] = [{"role": "user", "content": "."}]
        if "system_prompt" in values:
            messages.insert(0, {"role": "system", "content": values["system_prompt"]})
        try:
            req = ChatCompletionRequest(messages=messages, **fields)
            # vars: the deprecated max_tokens, read without a warning.
            max_tokens = vars(req).get("max_tokens")
            req.to_sampling_params(1 if max_tokens is None else max_tokens, {})
        except ValidationError as exc:
            errors = exc.errors()
            name = str(errors[0]["loc"][0]) if errors[0]["loc"] else None
            param = "system_prompt" if name == "messages" else name
            # A union type (stop: a string or a list) fails once per alternative.
            why = " or ".join(
                dict.fromkeys(e["msg"] for e in errors if e["loc"][:1] == errors[0]["loc"][:1])
            )
            raise InvalidRequest(f"{param}: {why}", param=param) from None
        except VLLMValidationError as exc:
            raise InvalidRequest(str(exc.args[0]), param=exc.parameter) from None
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        refused = self._renderer.validate_chat_template(
            request_chat_template=req.chat_template,
            chat_template_kwargs=None,
            trust_request_chat_template=self._trust_request_chat_template,
        )
        if refused is not None:
            raise InvalidRequest(refused.error.message, param="chat_template")
        return req

    # -- the routes' work ----------------------------------------------------------------

    async def create_chat(self, req: ChatCompletionRequest, raw: Request) -> Answer:
        return await self._run(self.chat.create_chat_completion, req, raw)

    async def create_completion(self, req: CompletionRequest, raw: Request) -> Answer:
        return await self._run(self.completion.create_completion, req, raw)

    async def create_response(self, req: ResponsesRequest, raw: Request) -> Answer:
        return await self._run(self.responses.create_responses, req, raw, events=True)

    async def tokenize(self, req: TokenizeRequest, raw: Request) -> Answer:
        return await self._run(self.tokenization.create_tokenize, req, raw)

    async def detokenize(self, req: DetokenizeRequest, raw: Request) -> Answer:
        return await self._run(self.tokenization.create_detokenize, req, raw)

    async def run_shadow(
        self, capture: ShadowCapture, lora: LoraHandle | None, request_id: str, priority: int
    ) -> ShadowOutput:
        """Run a captured request's engine input again with `lora`, at `priority`, straight
        on the engine (no quota, no scope): only its tokens and latency come back."""
        params = capture.params.clone()
        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output at the end suffices
        started = time.perf_counter()
        tokens: dict[int, list[int]] = {}
        async for out in self._engine_client.generate(
            capture.prompt,
            params,
            request_id,
            lora_request=None if lora is None else lora_request(lora),
            priority=priority,
            **capture.kwargs,
        ):
            for c in out.outputs:
                tokens[c.index] = list(c.token_ids)
        return ShadowOutput(tokens=tokens, latency_s=time.perf_counter() - started)

    @staticmethod
    def enter(scope: RequestScope) -> None:
        """Make `scope` the current request's (a context variable: each request runs in
        its own task, and the stream it returns is iterated within that task's context)."""
        _SCOPE.set(scope)

    async def _run(
        self, handler: Callable[..., Any], req: Any, raw: Request, *, events: bool = False
    ) -> Answer:
        try:
            result = await handler(req, raw)
        except ServerError:
            raise
        except Exception as exc:
            raise as_server_error(exc) from exc
        if isinstance(result, ErrorResponse):
            raise as_server_error(result)
        if isinstance(
            result, (ChatCompletionResponse, CompletionResponse, ResponsesResponse)
        ) or hasattr(result, "model_dump"):
            return Answer(body=_dump(result))
        if events:
            return Answer(stream=_convert_stream_to_sse_events(result))
        return Answer(stream=_our_error_frames(result, self._engine_client))

    def model_list(self, names: list[tuple[str, str | None, str | None]]) -> ModelList:
        """/v1/models in vLLM's shape: (id, parent, kind) for each name we list."""
        return ModelList(data=[self.model_card(*entry) for entry in names])

    def model_card(self, model_id: str, parent: str | None, kind: str | None) -> ModelCard:
        # `root` is the base name, never a filesystem path (vLLM exposes the path there).
        extra = {} if kind is None else {"kind": kind}  # ours: marks aliases
        return ModelCard(
            id=model_id,
            created=0,
            owned_by="loraswap",
            root=parent or model_id,
            parent=parent,
            max_model_len=self.max_model_len,
            **extra,
        )


_ERROR_FRAME = 'data: {"error"'


async def _our_error_frames(frames: AsyncIterator[str], client: Any) -> AsyncGenerator[str, None]:
    """vLLM's SSE frames, except that an error frame (vLLM catches a failure inside the
    stream and frames it itself) is re-told through our one table: the status and code a
    client sees mid-stream are those it would have seen before the first byte."""
    async for frame in frames:
        if frame.startswith(_ERROR_FRAME):
            yield _reframe(frame, client)
        else:
            yield frame


def _reframe(frame: str, client: Any) -> str:
    try:
        info = json.loads(frame.removeprefix("data: "))["error"]
        err: ServerError = as_server_error(
            create_error_response(str(info.get("message")), status_code=HTTPStatus(info["code"]))
        )
    except (ValueError, KeyError, TypeError):
        err = EngineFailure("the engine failed during the stream")
    if getattr(client, "errored", False):
        err = EngineUnavailable("the inference engine is not running")
    _, body = describe(err)
    return f"data: {json.dumps(body)}\n\n"
