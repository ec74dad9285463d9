"""A fake engine for fast unit tests of routing, formatting and errors. Never used where a
test claims end-to-end behaviour: those run server/engine/vllm.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from server.engine.base import ChoiceDelta, EngineChunk, LoraHandle, SamplingSpec, TokenLogprob
from server.errors import EngineUnavailable


class CharTokenizer:
    """One token per character: lengths in tests are easy to reason about."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeEngine:
    """Replies `<adapter or base>: ok ok ok ...`, one character per token."""

    def __init__(self, max_model_len: int = 256, token_delay_s: float = 0.0) -> None:
        self._tokenizer = CharTokenizer()
        self._max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.loaded: list[LoraHandle] = []
        self.load_delay_s = 0.0
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.dead = False
        self.removed: list[int] = []
        self.priorities: list[int] = []
        self.pinned: list[int] = []

    @property
    def tokenizer(self) -> CharTokenizer:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        lora: LoraHandle | None,
        priority: int = 0,
    ) -> AsyncIterator[EngineChunk]:
        if self.dead:
            raise EngineUnavailable("the inference engine is not running")
        self.priorities.append(priority)
        reply = f"{lora.name if lora else 'base'}: " + "ok " * 100
        self.running.add(request_id)
        try:
            for i in range(sampling.max_tokens):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                last = i == sampling.max_tokens - 1
                choices = []
                for n in range(sampling.n):
                    ch = reply[i % len(reply)]
                    lp = None
                    if sampling.logprobs is not None:
                        lp = [
                            TokenLogprob(
                                ch, -0.5, tuple((ch, -0.5) for _ in range(sampling.logprobs))
                            )
                        ]
                    stop_hit = any(reply[: i + 1].endswith(s) for s in sampling.stop)
                    choices.append(
                        ChoiceDelta(
                            index=n,
                            text="" if stop_hit else ch,
                            token_ids=[ord(ch)],
                            logprobs=lp,
                            finish_reason="stop" if stop_hit else ("length" if last else None),
                        )
                    )
                yield EngineChunk(choices=choices, prompt_tokens=len(prompt_token_ids))
                if any(c.finish_reason for c in choices):
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            self.running.discard(request_id)

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
