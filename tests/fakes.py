"""A fake engine for fast unit tests of routing, admission and errors. Never used where a
test claims end-to-end behaviour: those run server/engine/vllm.py.

vLLM's own OpenAI layer runs on top of it, unchanged: `FakeEngine.engine_client` has the
surface of vLLM's EngineClient that the serving objects use (the real model config,
renderer and tokenizer of the demo model, built once per session), but `generate` runs
no model: it replies `<adapter or base>: ok ok ok ...`, one real token per step.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator
from typing import Any

import vllm.plugins

from server.engine.base import LoraHandle
from server.errors import EngineUnavailable

# vLLM loads its general plugins, ours among them, when engine args are parsed or a config
# is built (here and in the app's lifespan): ours patches vLLM's CPU LoRA ops for the
# whole process (server/engine/vllm.py). No model runs on a fake engine, and
# tests/unit/test_lora_ops.py needs the upstream ops as they are, so none is loaded.
vllm.plugins.plugins_loaded = True

REPLY_WORD = "ok "
_MAX_TOP = 5  # alternatives per position when a request asks for "all" logprobs (-1)


def demo_model_dir() -> Any:
    """The demo base model (`loraswap demo prepare` builds it; the README's test command
    runs that before pytest). Its config and tokenizer are real; no weights are read."""
    from server.demo import demo_assets
    from server.settings import Settings

    base = demo_assets(Settings().home).base_dir
    if not (base / "config.json").is_file():
        raise RuntimeError(
            f"the demo model is missing under {base}: run `loraswap demo prepare` first "
            "(the unit tests use its config and tokenizer)"
        )
    return base


@functools.cache
def vllm_parts(max_model_len: int) -> tuple[Any, Any, Any]:
    """(vllm_config, renderer, input_processor) as AsyncLLM builds them, once per length."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor

    config = AsyncEngineArgs(
        model=str(demo_model_dir()),
        max_model_len=max_model_len,
        enable_lora=True,
        max_lora_rank=64,
        max_loras=4,
        dtype="float32",
    ).create_engine_config()
    renderer = renderer_from_config(config)
    return config, renderer, InputProcessor(config, renderer)


def reply_text(lora_name: str | None) -> str:
    """What the fake engine answers (before max_tokens and stop strings cut it)."""
    return f"{lora_name or 'base'}: " + REPLY_WORD * 100


# -- what tests expect, derived from the real tokenizer (the same for every max_model_len)


def tokenizer() -> Any:
    return vllm_parts(256)[1].tokenizer


def reply_ids(lora_name: str | None, n_tokens: int) -> list[int]:
    """The first `n_tokens` token ids of the reply for an adapter (None: the base)."""
    ids: list[int] = tokenizer().encode(reply_text(lora_name), add_special_tokens=False)
    return [ids[i % len(ids)] for i in range(n_tokens)]


def reply(lora_name: str | None, n_tokens: int) -> str:
    """The text of the first `n_tokens` tokens of the reply to a request for an adapter
    version (`"pirate@1"`; None: the base), i.e. with `max_tokens=n_tokens`."""
    text: str = tokenizer().decode(reply_ids(lora_name, n_tokens), skip_special_tokens=True)
    return text


def chat_prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids for a conversation, by the model's own chat template."""
    ids: list[int] = tokenizer().apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return ids


def prompt_ids(text: str) -> list[int]:
    """A completion prompt's token ids (this model's tokenizer adds no BOS)."""
    ids: list[int] = tokenizer().encode(text)
    return ids


class FakeEngineClient:
    """vLLM's EngineClient as far as vLLM's serving objects use it."""

    def __init__(self, engine: FakeEngine, max_model_len: int) -> None:
        self._engine = engine
        self.vllm_config, self.renderer, self.input_processor = vllm_parts(max_model_len)
        self.model_config = self.vllm_config.model_config
        self.tokenizer = self.renderer.tokenizer

    @property
    def errored(self) -> bool:
        return self._engine.dead

    @property
    def is_running(self) -> bool:
        return not self._engine.dead

    @property
    def is_stopped(self) -> bool:
        return self._engine.dead

    @property
    def dead_error(self) -> BaseException:
        from vllm.v1.engine.exceptions import EngineDeadError

        return EngineDeadError()

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        pass

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    async def is_tracing_enabled(self) -> bool:
        return False

    async def abort(self, request_id: Any) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._engine.aborted.extend(i for i in ids if i not in self._engine.aborted)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

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
        return self._generate(prompt, sampling_params, request_id, lora_request, priority)

    async def _generate(
        self, prompt: Any, params: Any, request_id: str, lora_request: Any, priority: int
    ) -> AsyncGenerator[Any, None]:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.outputs import RequestOutput
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        engine = self._engine
        if engine.dead:
            raise EngineDeadError()
        try:
            # vLLM's own checks of a request, as AsyncLLM.add_request runs them.
            self.input_processor.process_inputs(
                request_id,
                prompt,
                params,
                supported_tasks=("generate",),
                lora_request=lora_request,
                priority=priority,
            )
        except (VLLMClientError, GracefulHTTPError):
            raise
        except Exception as exc:
            raise EngineGenerateError() from exc
        engine.priorities.append(priority)
        engine.requests.append((request_id, lora_request))
        await engine.on_generate(request_id)
        prompt_ids = list(prompt.get("prompt_token_ids") or [])
        engine.inputs.append((prompt_ids, params))
        reply = self.tokenizer.encode(
            reply_text(_version_name(lora_request)), add_special_tokens=False
        )
        choices = [_Choice(i, params, self.tokenizer) for i in range(params.n)]
        kind = params.output_kind
        delta = kind == RequestOutputKind.DELTA
        prompt_logprobs = _prompt_logprobs(params, prompt_ids, self.tokenizer)
        first = True
        engine.running.add(request_id)
        try:
            for step in range(params.max_tokens):
                if engine.token_delay_s:
                    await asyncio.sleep(engine.token_delay_s)
                else:
                    await asyncio.sleep(0)  # let others run, as a real engine step would
                if engine.die_after_tokens is not None and step >= engine.die_after_tokens:
                    engine.dead = True
                if engine.dead:
                    raise EngineDeadError()
                last = step == params.max_tokens - 1
                for choice in choices:
                    if not choice.done:
                        choice.step(reply[step % len(reply)], last)
                finished = all(c.done for c in choices)
                if kind == RequestOutputKind.FINAL_ONLY and not finished:
                    continue
                yield RequestOutput(
                    request_id=request_id,
                    prompt=prompt.get("prompt"),
                    prompt_token_ids=prompt_ids,
                    # Streamed (DELTA): the prompt's logprobs come with the first output only.
                    prompt_logprobs=prompt_logprobs if first or not delta else None,
                    outputs=[c.output(delta=delta) for c in choices if not delta or c.fresh],
                    finished=finished,
                    lora_request=lora_request,
                    num_cached_tokens=0,
                )
                first = False
                if finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            engine.aborted.append(request_id)
            raise
        finally:
            engine.running.discard(request_id)


def _version_name(lora_request: Any) -> str | None:
    """`adapter@version` of a LoRARequest (None: the base): its lora_name without the
    content digest our engine names carry (server/engine/base.py LoraHandle.engine_name),
    so tests can predict the reply."""
    if lora_request is None:
        return None
    name: str = lora_request.lora_name
    return name.split("+", 1)[0]


class _Choice:
    """One of a request's `n` sequences, as vLLM's detokenizer and logprobs processor
    keep it: stop strings cut the text (held back while they could still match)."""

    def __init__(self, index: int, params: Any, tokenizer: Any) -> None:
        self.index = index
        self._params = params
        self._tokenizer = tokenizer
        self._stops: list[str] = list(params.stop or [])
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, Any]] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self._sent_text = 0
        self._sent_tokens = 0
        self.fresh = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self, token: int, last: bool) -> None:
        from vllm.logprobs import Logprob

        self.token_ids.append(token)
        self.fresh = True
        if self.logprobs is not None:
            k = self._params.logprobs
            k = _MAX_TOP if k == -1 else k
            top = [token] + [(token + j) % self._tokenizer.vocab_size for j in range(1, k)]
            position = {token: Logprob(-0.5, rank=1, decoded_token=self._decode([token]))}
            for rank, tid in enumerate(top[1:], start=2):
                position[tid] = Logprob(-0.5 - rank, rank=rank, decoded_token=self._decode([tid]))
            self.logprobs.append(position)
        text = self._decode(self.token_ids)
        for stop in self._stops:
            at = text.find(stop)
            if at != -1:
                keep = at + len(stop) if self._params.include_stop_str_in_output else at
                self.text = text[:keep]
                self.finish_reason, self.stop_reason = "stop", stop
                return
        self.text = text
        if last:
            self.finish_reason = "length"

    def output(self, *, delta: bool) -> Any:
        from vllm.outputs import CompletionOutput

        self.fresh = False
        if not delta:
            return CompletionOutput(
                index=self.index,
                text=self.text,
                token_ids=list(self.token_ids),
                cumulative_logprob=self._cumulative(),
                logprobs=None if self.logprobs is None else list(self.logprobs),
                finish_reason=self.finish_reason,
                stop_reason=self.stop_reason,
            )
        # Streaming: hold back what could still turn out to be the start of a stop string.
        hold = max((len(s) - 1 for s in self._stops), default=0)
        upto = len(self.text) if self.done else max(self._sent_text, len(self.text) - hold)
        text, self._sent_text = self.text[self._sent_text : upto], upto
        tokens, start = self.token_ids[self._sent_tokens :], self._sent_tokens
        self._sent_tokens = len(self.token_ids)
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=tokens,
            cumulative_logprob=self._cumulative(),
            logprobs=None if self.logprobs is None else self.logprobs[start:],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def _cumulative(self) -> float | None:
        return None if self.logprobs is None else -0.5 * len(self.logprobs)

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text


def _prompt_logprobs(params: Any, prompt_ids: list[int], tokenizer: Any) -> Any:
    """vLLM's shape: None for the first position, then one entry per prompt token."""
    if params.prompt_logprobs is None:
        return None
    from vllm.logprobs import Logprob

    out: list[dict[int, Any] | None] = [None]
    for tid in prompt_ids[1:]:
        out.append({tid: Logprob(-1.0, rank=1, decoded_token=tokenizer.decode([tid]))})
    return out


async def lease_endings(router: Any) -> None:
    """Wait for the engine removals that ended leases started (the router runs them as
    tasks of their own, so a test asserting a removal waits for them first)."""
    await router.pool.settle()


class FakeEngine:
    """Our Engine protocol over a FakeEngineClient: adapter residency is recorded."""

    def __init__(self, max_model_len: int = 256, token_delay_s: float = 0.0) -> None:
        self._max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.loaded: list[LoraHandle] = []
        self.load_delay_s = 0.0
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.dead = False
        # The engine dies (as vLLM's EngineCore can) once a request has had this many
        # tokens: errors after a stream has started.
        self.die_after_tokens: int | None = None
        self.removed: list[int] = []
        self.priorities: list[int] = []
        self.pinned: list[int] = []
        # (engine request id, vLLM LoRARequest or None) of every request that ran
        self.requests: list[tuple[str, Any]] = []
        # (prompt token ids, SamplingParams) of every request that ran
        self.inputs: list[tuple[list[int], Any]] = []
        self._client: FakeEngineClient | None = None

    @property
    def engine_client(self) -> FakeEngineClient:
        if self._client is None:  # built on first use: tests of routing alone never need it
            self._client = FakeEngineClient(self, self._max_model_len)
        return self._client

    @property
    def tokenizer(self) -> Any:
        return self.engine_client.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def on_generate(self, request_id: str) -> None:
        """Called as a request reaches the engine (a hook for tests to hold it there)."""

    async def add_lora(self, lora: LoraHandle) -> None:
        if self.load_delay_s:
            await asyncio.sleep(self.load_delay_s)
        self.loaded.append(lora)

    async def remove_lora(self, lora_id: int) -> None:
        self.removed.append(lora_id)

    async def pin_lora(self, lora_id: int) -> None:
        self.pinned.append(lora_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineUnavailable("the inference engine is not running")

    async def num_running(self) -> int:
        return len(self.running)

    def shutdown(self) -> None:
        pass
