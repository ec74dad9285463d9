"""Inference: OpenAI's chat and text completions, and the model list."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from clients._endpoints.calls import endpoint, inference, stream_endpoint
from clients._wire import Op, Spec, completion, data_list, inference_body
from clients.types import Completion, ModelInfo


class InferenceEndpoints:
    """Calls with the tenant's key that run the engine; they return `Completion`s (the
    OpenAI-shaped body and `served_by`, from the response headers) or streams."""

    @endpoint
    def chat(
        self, /, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> Op[Completion]:
        """A chat completion. `model` is `<base>`, `<base>:<adapter>`, an adapter or an alias;
        `params` are OpenAI's (`temperature`, `max_tokens`, `user`, ...)."""
        body = inference_body({"model": model, "messages": list(messages)}, params, stream=False)
        return Op(inference("/v1/chat/completions", body), completion)

    @stream_endpoint
    def chat_stream(
        self, /, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> Spec:
        """A streamed chat completion: iterate the chunks; `served_by` is known at once.
        `stream_options={"include_usage": True}` adds a last chunk with the usage."""
        body = inference_body({"model": model, "messages": list(messages)}, params, stream=True)
        return inference("/v1/chat/completions", body)

    @endpoint
    def completions(
        self, /, model: str, prompt: str | Sequence[int], **params: Any
    ) -> Op[Completion]:
        """A text completion of one prompt (text or token ids)."""
        body = inference_body({"model": model, "prompt": _prompt(prompt)}, params, stream=False)
        return Op(inference("/v1/completions", body), completion)

    @stream_endpoint
    def completions_stream(self, /, model: str, prompt: str | Sequence[int], **params: Any) -> Spec:
        """A streamed text completion."""
        body = inference_body({"model": model, "prompt": _prompt(prompt)}, params, stream=True)
        return inference("/v1/completions", body)

    @endpoint
    def models(self) -> Op[list[ModelInfo]]:
        """The base, every adapter (`<base>:<adapter>`) and every alias (`kind: alias`)."""
        return Op(Spec("GET", "/v1/models", "api", replayable=True), data_list)


def _prompt(prompt: str | Sequence[int]) -> str | list[int]:
    return prompt if isinstance(prompt, str) else list(prompt)
