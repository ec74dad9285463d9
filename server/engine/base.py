"""The engine protocol: what serving needs from an inference engine, and nothing more.

server/engine/vllm.py implements it on vLLM; tests may implement it with a fake. Keeping
vLLM's types out of this file is what lets routing and errors be tested in milliseconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class LoraHandle:
    """An adapter version as the engine knows it. `lora_id` is never reused for other weights."""

    name: str
    lora_id: int
    path: str
    # Content digest of weights + config (adapters_registry/digest.py); "" if unknown.
    digest: str = ""

    @property
    def engine_name(self) -> str:
        """The LoRA name the engine sees: `name` plus the content digest, because vLLM's
        prefix cache keys on it, so two contents never share cached KV under one name."""
        return f"{self.name}+{self.digest[:16]}" if self.digest else self.name


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives per token; None = off
    ignore_eos: bool = False  # benchmarks and tests that need a fixed output length


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished


@dataclass
class EngineChunk:
    choices: list[ChoiceDelta] = field(default_factory=list)
    prompt_tokens: int = 0


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for `messages`, with the generation prompt appended."""
        ...


class Engine(Protocol):
    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        lora: LoraHandle | None,
        priority: int = 0,
    ) -> AsyncIterator[EngineChunk]:
        """Stream deltas. Cancelling the iteration aborts the request in the engine.

        Lower `priority` values are scheduled first (used for tenant fairness)."""
        ...

    async def add_lora(self, lora: LoraHandle) -> None:
        """Load adapter weights into the engine (idempotent per lora_id)."""
        ...

    async def remove_lora(self, lora_id: int) -> None:
        """Drop an adapter from the engine (after its last request)."""
        ...

    async def pin_lora(self, lora_id: int) -> None:
        """Keep an adapter resident in the engine's cache."""
        ...

    async def check_health(self) -> None:
        """Raise EngineUnavailable if the engine cannot serve."""
        ...

    async def num_running(self) -> int:
        """Requests the engine holds right now (for tests of aborts)."""
        ...

    def shutdown(self) -> None: ...
