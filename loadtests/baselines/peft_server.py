"""The naive baseline: transformers + PEFT behind FastAPI, the way LoRA serving tutorials
do it. One model, every adapter loaded once (`PeftModel.load_adapter`), and per request:
take the lock, `set_adapter(name)` (or disable adapters for the base), greedy
`model.generate`, release. No batching: requests run one at a time.

    python -m loadtests.baselines.peft_server --model DIR --adapter pirate=PATH --port 8003

OpenAI chat route (`POST /v1/chat/completions`, streaming or not, usage included),
`GET /v1/models` and `GET /health`; errors in OpenAI's shape. Only what the load
generator needs: `messages`, `model`, `max_tokens` / `max_completion_tokens`, `stream`;
sampling is always greedy.

Two things are less naive than a tutorial, for the measurement's sake only: generation
runs in a worker thread so the event loop keeps accepting and streaming, and a client
that disconnects stops its generation (as vLLM aborts it), so requests abandoned at the
end of one measured window do not keep the model busy in the next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

DEFAULT_MAX_TOKENS = 16


class _TokenStreamer(BaseStreamer):
    """Hands each generated token id to `on_token` (generate's first call is the prompt)."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self._on_token = on_token
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._on_token(int(token))

    def end(self) -> None:
        pass


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self._event.is_set()


class PeftServer:
    def __init__(
        self,
        model_dir: Path,
        adapters: dict[str, Path],
        served_name: str = "smollm2",
        dtype: str = "bfloat16",
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.served_name = served_name
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype)
        )
        self.adapters = list(adapters)
        if self.adapters:
            first, *rest = self.adapters
            model = PeftModel.from_pretrained(model, str(adapters[first]), adapter_name=first)
            for name in rest:
                model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model = model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # One worker thread and one lock: the model serves one request at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._lock = asyncio.Lock()

    # -- the model ---------------------------------------------------------------------

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base); KeyError if unknown."""
        if model == self.served_name:
            return None
        base, sep, name = model.partition(":")
        if sep and base != self.served_name:
            raise KeyError(model)
        name = name if sep else model
        if name not in self.adapters:
            raise KeyError(model)
        return name

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        if not self.adapters:
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(adapter)  # the per-request swap
            yield

    @torch.inference_mode()
    def generate(
        self,
        adapter: str | None,
        prompt_ids: list[int],
        max_tokens: int,
        on_token: Callable[[int], None],
        stop: threading.Event,
    ) -> None:
        """Greedy generation; runs in the worker thread, under the lock."""
        inputs = torch.tensor([prompt_ids])
        with self._adapter(adapter):
            self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=min(self.eos_ids),
                streamer=_TokenStreamer(on_token),
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
            )

    async def tokens(
        self, adapter: str | None, prompt_ids: list[int], max_tokens: int
    ) -> AsyncGenerator[int, None]:
        """The generated token ids (end of sequence excluded), as they come.

        The lock is released by the generation's own completion, not by this generator's
        cleanup: when the client leaves, the thread still runs until it sees the stop
        flag, and no other request may touch the model (set_adapter!) before that.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        stop = threading.Event()

        def on_token(token: int) -> None:  # in the worker thread
            loop.call_soon_threadsafe(queue.put_nowait, token)

        await self._lock.acquire()
        try:
            future = loop.run_in_executor(
                self._executor,
                self.generate,
                adapter,
                prompt_ids,
                max_tokens,
                on_token,
                stop,
            )
        except BaseException:
            self._lock.release()
            raise

        def finished(_: object) -> None:
            self._lock.release()
            queue.put_nowait(None)

        future.add_done_callback(finished)
        try:
            while (token := await queue.get()) is not None:
                if token in self.eos_ids:
                    continue
                yield token
            await future  # a failed generation raises here
        finally:
            stop.set()


def _error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def _sse(data: object) -> str:
    return f"data: {json.dumps(data)}\n\n"


@dataclass(frozen=True)
class _ChatRequest:
    """The fields of an OpenAI chat request this server reads."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    stream: bool
    include_usage: bool

    @classmethod
    def parse(cls, body: Any) -> _ChatRequest:
        """Raises ValueError, KeyError or TypeError on a malformed body."""
        messages = [
            {"role": str(m["role"]), "content": str(m["content"])} for m in body["messages"]
        ]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        stream = bool(body.get("stream"))
        return cls(
            model=str(body["model"]),
            messages=messages,
            max_tokens=int(max_tokens or DEFAULT_MAX_TOKENS),
            stream=stream,
            # stream_options is read only for a stream, as OpenAI does
            include_usage=stream and bool((body.get("stream_options") or {}).get("include_usage")),
        )


class _Reply:
    """One chat completion being generated: as one JSON body, or as server-sent events."""

    def __init__(self, server: PeftServer, request: _ChatRequest, adapter: str | None) -> None:
        self.server, self.request, self.adapter = server, request, adapter
        self.prompt_ids = server.prompt_ids(request.messages)
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = len(self.prompt_ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def finish_reason(self, count: int) -> str:
        return "length" if count >= self.request.max_tokens else "stop"

    def head(self, kind: str) -> dict[str, Any]:
        """The fields every body and chunk of this reply starts with."""
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model}

    def chunk(self, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {**self.head("chat.completion.chunk"), "choices": [choice]}

    async def generated(self) -> AsyncGenerator[tuple[str, int], None]:
        """(new text, tokens so far): decoding the whole output each time keeps
        multi-byte characters split across tokens intact."""
        server, ids, text = self.server, [], ""
        tokens = server.tokens(self.adapter, self.prompt_ids, self.request.max_tokens)
        # aclosing: a consumer that stops early stops the generation now, not when
        # the garbage collector gets to the abandoned generator.
        async with contextlib.aclosing(tokens) as it:
            async for token in it:
                ids.append(token)
                full = str(server.tokenizer.decode(ids, skip_special_tokens=True))
                yield full[len(text) :], len(ids)
                text = full

    async def complete(self) -> JSONResponse:
        parts, count = [], 0
        async with contextlib.aclosing(self.generated()) as pieces:
            async for piece, produced in pieces:
                parts.append(piece)
                count = produced
        message = {"role": "assistant", "content": "".join(parts)}
        choice = {"index": 0, "message": message, "finish_reason": self.finish_reason(count)}
        body = {**self.head("chat.completion"), "choices": [choice], "usage": self.usage(count)}
        return JSONResponse(body)

    async def events(self) -> AsyncIterator[str]:
        yield _sse(self.chunk({"role": "assistant", "content": ""}))
        count = 0
        try:
            async with contextlib.aclosing(self.generated()) as pieces:
                async for piece, produced in pieces:
                    count = produced
                    if piece:
                        yield _sse(self.chunk({"content": piece}))
        except Exception as exc:  # after the 200: an error frame, as OpenAI servers do
            yield _sse({"error": {"message": str(exc), "type": "internal_server_error"}})
            yield "data: [DONE]\n\n"
            return
        yield _sse(self.chunk({}, self.finish_reason(count)))
        if self.request.include_usage:
            yield _sse({**self.chunk({}), "choices": [], "usage": self.usage(count)})
        yield "data: [DONE]\n\n"


async def _chat(server: PeftServer, request: Request) -> Response:
    try:
        chat = _ChatRequest.parse(await request.json())
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, f"invalid request: {exc}", "invalid_request_error")
    try:
        adapter = server.adapter_of(chat.model)
    except KeyError:
        message = f"The model '{chat.model}' does not exist"
        return _error(404, message, "not_found_error", "model_not_found")
    reply = _Reply(server, chat, adapter)
    if not chat.stream:
        return await reply.complete()
    return StreamingResponse(reply.events(), media_type="text/event-stream")


def create_app(server: PeftServer) -> FastAPI:
    app = FastAPI(title="naive transformers + PEFT server")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [server.served_name] + [f"{server.served_name}:{a}" for a in server.adapters]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "peft"} for n in names],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Response:
        return await _chat(server, request)

    return app


def _adapter_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Naive transformers + PEFT LoRA server.")
    parser.add_argument("--model", type=Path, required=True, help="base model folder")
    parser.add_argument(
        "--adapter", type=_adapter_arg, action="append", default=[], help="NAME=PATH, repeat"
    )
    parser.add_argument("--served-model-name", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args(argv)
    # Load before serving: /health answers only once the model is ready.
    server = PeftServer(
        args.model, dict(args.adapter), args.served_model_name, args.dtype, args.threads
    )
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
