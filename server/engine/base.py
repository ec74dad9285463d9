"""The engine protocol: what the server needs from an inference engine, and nothing more.

Inference itself goes through vLLM's own OpenAI layer (server/engine/openai_layer.py),
which talks to `engine_client` (vLLM's EngineClient: a real AsyncLLM, or a fake with the
same surface in unit tests). What stays ours is adapter residency, health and shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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


class Engine(Protocol):
    @property
    def engine_client(self) -> Any:
        """vLLM's EngineClient that the OpenAI serving objects run on."""
        ...

    @property
    def max_model_len(self) -> int: ...

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
