"""The HTTP API against a fake engine: routing, wire format, errors. Fast: vLLM's OpenAI
layer runs for real, on the demo model's tokenizer, but no model runs (tests/fakes.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.app import create_app
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import (
    FakeEngine,
    chat_prompt_ids,
    prompt_ids,
    reply,
    reply_ids,
    tokenizer,
)
from tests.testclient import ClientResponse


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=200)


@pytest.fixture
def client(tmp_path: Path, engine: FakeEngine) -> Iterator[TestClient]:
    root = tmp_path / "adapters"
    make_adapter(root / "pirate")
    make_adapter(root / "formal", targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    (make_adapter(root / "pickled") / "adapter_model.bin").write_bytes(b"\x80")
    make_adapter(root / "huge", rank=64)
    make_adapter(root / "alien", hidden_scale=2)
    with TestClient(create_app(tiny_settings(tmp_path, max_tokens_cap=100), engine=engine)) as c:
        yield c


def tiny_settings(tmp_path: Path, **extra: Any) -> Settings:
    """A tiny synthetic base and the adapters folder under tmp_path, registry in tmp_path."""
    if not (tmp_path / "base").exists():
        make_base(tmp_path / "base")
    return Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        adapters_dir=tmp_path / "adapters",
        home=tmp_path / "home",
        **extra,
    )


def chat(client: TestClient, model: str, **extra: object) -> ClientResponse:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    return client.post("/v1/chat/completions", json={**body, **extra})


def error_of(response: ClientResponse) -> dict[str, Any]:
    err: dict[str, Any] = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("model", "served", "lora"),
    [
        ("tiny", "tiny", None),
        ("tiny:pirate", "tiny:pirate", "pirate@1"),
        ("pirate", "tiny:pirate", "pirate@1"),
    ],
)
def test_model_names_route(client: TestClient, model: str, served: str, lora: str | None) -> None:
    r = chat(client, model)
    assert r.status_code == 200, r.text
    body = r.json()
    ChatCompletion.model_validate(body)
    assert body["model"] == served
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", reply(lora, 8))
    assert body["choices"][0]["finish_reason"] == "length"
    prompt_tokens = len(chat_prompt_ids(HI))
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        prompt_tokens,
        8,
        prompt_tokens + 8,
    )
    if served != "tiny":
        assert r.headers["x-adapter"] == "pirate"
        assert r.headers["x-adapter-version"] == "1"
    else:
        assert "x-adapter" not in r.headers


@pytest.mark.parametrize(
    "model",
    ["nope", "tiny:nope", "other:pirate", "tiny:", "tiny:../base", "tiny:Pirate", ":pirate"],
)
def test_unknown_model_is_404(client: TestClient, model: str) -> None:
    r = chat(client, model)
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "model_not_found"
    assert err["param"] == "model"
    assert model in str(err["message"])


@pytest.mark.parametrize(
    ("model", "status", "code", "message"),
    [
        ("tiny:pickled", 422, "adapter_unsafe_format", "only safetensors"),
        ("tiny:huge", 422, "adapter_rank_too_large", "rank 64 exceeds"),
        ("tiny:alien", 422, "adapter_incompatible", "base model 'tiny'"),
    ],
)
def test_bad_adapter_is_clear_4xx_and_others_keep_working(
    client: TestClient, engine: FakeEngine, model: str, status: int, code: str, message: str
) -> None:
    r = chat(client, model)
    assert r.status_code == status
    err = error_of(r)
    assert err["code"] == code
    assert message in str(err["message"])
    assert engine.loaded == []  # never reached the engine
    assert r.json()["error"]["param"] == "model"
    assert chat(client, "tiny:pirate").status_code == 200


def test_adapter_loaded_once_with_unique_ids(client: TestClient, engine: FakeEngine) -> None:
    for _ in range(3):
        assert chat(client, "tiny:pirate").status_code == 200
    assert chat(client, "formal").status_code == 200
    assert [(h.name, h.lora_id) for h in engine.loaded] == [("pirate@1", 1), ("formal@1", 2)]


def test_models_lists_base_and_adapters(client: TestClient) -> None:
    data = client.get("/v1/models").json()["data"]
    ids = {m["id"]: m["parent"] for m in data}
    assert ids == {
        "tiny": None,
        "tiny:alien": "tiny",
        "tiny:formal": "tiny",
        "tiny:huge": "tiny",
        "tiny:pickled": "tiny",
        "tiny:pirate": "tiny",
    }


def test_completions(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": "tiny:formal", "prompt": "abc", "max_tokens": 5, "n": 2, "logprobs": 2},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    completion = Completion.model_validate(body)
    assert completion.object == "text_completion"
    assert completion.model == "tiny:formal"
    text = reply("formal@1", 5)
    assert [c.text for c in completion.choices] == [text, text]
    lp = completion.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    tokens = [tokenizer().decode([t]) for t in reply_ids("formal@1", 5)]
    assert lp.tokens == tokens
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(5)]
    assert lp.top_logprobs is not None
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 10
    assert completion.usage.prompt_tokens == len(prompt_ids("abc"))


def test_token_ids_extension(client: TestClient) -> None:
    body = chat(client, "tiny", return_token_ids=True, max_tokens=3).json()
    assert body["prompt_token_ids"] == chat_prompt_ids(HI)
    assert body["choices"][0]["token_ids"] == reply_ids(None, 3)


def test_stop_strings(client: TestClient) -> None:
    body = chat(client, "tiny", stop=["e:"], max_tokens=50).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == "bas"


def sse_events(response: ClientResponse) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_streaming_with_usage(client: TestClient) -> None:
    body = {
        "model": "tiny:pirate",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-adapter"] == "pirate"
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"]["content"] == ""
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reply("pirate@1", 4)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == "tiny:pirate" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c.get("usage") is None for c in chunks[:-1])


def test_completion_streaming_without_usage(client: TestClient) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reply(None, 3)
    assert all(e.get("usage") is None for e in events[:-1])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 17}, "n"),
        ({"priority": 5}, "priority"),
    ],
)
def test_invalid_parameters_name_the_param(
    client: TestClient, extra: dict[str, object], param: str
) -> None:
    r = chat(client, "tiny", **extra)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"n": 0}, "n must be at least 1"),
        ({"messages": []}, "empty conversation"),
    ],
)
def test_parameters_vllm_refuses_are_400_in_openai_shape(
    client: TestClient, extra: dict[str, object], message: str
) -> None:
    # vLLM's own checks (its messages, no param): still a 400 through our table.
    r = chat(client, "tiny", **extra)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    assert message in str(err["message"])


def test_malformed_json(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert "not valid JSON" in str(error_of(r)["message"])


def test_unknown_fields_are_400_naming_them(client: TestClient, engine: FakeEngine) -> None:
    r = chat(client, "tiny", frobnicate=True)
    assert r.status_code == 400
    err = error_of(r)
    assert (err["type"], err["param"]) == ("invalid_request_error", "frobnicate")
    assert "frobnicate" in str(err["message"])
    assert engine.requests == []


def test_prompt_longer_than_context(client: TestClient, engine: FakeEngine) -> None:
    messages = [{"role": "user", "content": "hello " * 300}]
    assert len(chat_prompt_ids(messages)) > 200
    r = chat(client, "tiny", messages=messages)
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "context_length_exceeded"
    assert err["param"] == "messages"
    assert "maximum context length is 200 tokens" in str(err["message"])
    assert engine.requests == []  # refused before the engine


def test_prompt_plus_max_tokens_over_context(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hello " * 150}]
    assert len(chat_prompt_ids(messages)) + 50 > 200 > len(chat_prompt_ids(messages))
    r = chat(client, "tiny", messages=messages, max_tokens=50)
    assert r.status_code == 400
    assert error_of(r)["code"] == "context_length_exceeded"
    assert chat(client, "tiny", messages=messages, max_tokens=5).status_code == 200


def test_max_tokens_cap(client: TestClient) -> None:
    r = chat(client, "tiny", max_tokens=101)
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == "max_tokens"
    assert "cap of 100" in str(err["message"])


def test_request_id_echoed_or_generated(client: TestClient) -> None:
    r = chat(client, "tiny", max_tokens=1)
    assert len(r.headers["x-request-id"]) == 32
    r = client.post(
        "/v1/chat/completions",
        headers={"x-request-id": "abc-123"},
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    assert r.headers["x-request-id"] == "abc-123"
    assert r.json()["id"] == "chatcmpl-abc-123"


def test_health_and_dead_engine(client: TestClient, engine: FakeEngine) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    engine.dead = True
    r = client.get("/health")
    assert r.status_code == 503
    assert error_of(r)["code"] == "engine_unavailable"


def test_requests_to_a_dead_engine_are_503(client: TestClient, engine: FakeEngine) -> None:
    engine.dead = True
    r = chat(client, "tiny")
    assert r.status_code == 503
    assert error_of(r)["code"] == "engine_unavailable"


def dying_stream(client: TestClient, engine: FakeEngine) -> list[object]:
    """A completion stream during which the engine dies, after the first token."""
    engine.die_after_tokens = 1
    body = {"model": "tiny", "prompt": "x", "max_tokens": 50, "stream": True}
    events: list[object] = []
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_error_frame_then_done(client: TestClient, engine: FakeEngine) -> None:
    events = dying_stream(client, engine)
    assert events[-1] == "[DONE]"
    assert isinstance(events[0], dict)
    assert events[0]["choices"][0]["text"] == reply(None, 1)
    assert isinstance(events[-2], dict)
    assert set(events[-2]["error"]) == {"message", "type", "param", "code"}
    assert all("error" not in e for e in events[:-2] if isinstance(e, dict))


def test_streaming_error_frame_uses_our_table(client: TestClient, engine: FakeEngine) -> None:
    frame = dying_stream(client, engine)[-2]
    assert isinstance(frame, dict)
    assert frame["error"]["code"] == "engine_unavailable"
    assert frame["error"]["type"] == "service_unavailable_error"


def test_concurrent_first_requests_load_adapter_once(tmp_path: Path) -> None:
    import asyncio

    import httpx

    engine = FakeEngine()
    engine.load_delay_s = 0.2
    make_adapter(tmp_path / "adapters" / "pirate")
    app = create_app(tiny_settings(tmp_path), engine=engine)

    async def run() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                body = {"model": "tiny:pirate", "prompt": "x", "max_tokens": 2}
                rs = await asyncio.gather(
                    *(c.post("/v1/completions", json=body) for _ in range(10))
                )
                return [r.status_code for r in rs]

    assert asyncio.run(run()) == [200] * 10
    assert len(engine.loaded) == 1


def test_non_streaming_disconnect_aborts(tmp_path: Path) -> None:
    import asyncio

    engine = FakeEngine(token_delay_s=0.05)
    app = create_app(tiny_settings(tmp_path), engine=engine)
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 200}).encode()

    async def run() -> float:
        async with app.router.lifespan_context(app):
            disconnect = asyncio.Event()
            sent = False

            async def receive() -> dict[str, object]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await disconnect.wait()
                return {"type": "http.disconnect"}

            async def send(_: MutableMapping[str, Any]) -> None:
                pass

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/v1/completions",
                "headers": [(b"content-type", b"application/json")],
                "query_string": b"",
                "http_version": "1.1",
                "scheme": "http",
                "server": ("t", 80),
                "client": ("c", 1),
                "root_path": "",
                "app": app,
            }
            task = asyncio.create_task(app(scope, receive, send))
            await asyncio.sleep(0.3)
            assert len(engine.running) == 1
            t0 = time.perf_counter()
            disconnect.set()
            while engine.running:
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - t0
            await asyncio.gather(task, return_exceptions=True)
            return elapsed

    elapsed = asyncio.run(run())
    assert elapsed < 1.0
    assert len(engine.aborted) == 1


def test_body_too_large_is_413(tmp_path: Path) -> None:
    app = create_app(tiny_settings(tmp_path, max_body_bytes=2048), engine=FakeEngine())
    big = {"model": "tiny", "prompt": "x" * 4000, "max_tokens": 1}
    with TestClient(app) as c:
        r = c.post("/v1/completions", json=big)
        assert r.status_code == 413
        assert error_of(r)["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
            payload = json.dumps(big).encode()
            for i in range(0, len(payload), 500):
                yield payload[i : i + 500]

        r = c.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        small = c.post(
            "/v1/completions",
            content=iter([json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1}).encode()]),
            headers={"content-type": "application/json"},
        )
        assert small.status_code == 200


def test_unknown_route_in_openai_shape(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert error_of(r)["type"] == "invalid_request_error"
    assert client.get("/v1/chat/completions").status_code == 405


def test_draining_refuses_new_requests_but_finishes_running_ones(tmp_path: Path) -> None:
    import asyncio

    import httpx

    engine = FakeEngine(token_delay_s=0.02)
    app = create_app(tiny_settings(tmp_path), engine=engine)

    async def run() -> tuple[int, int, bool, int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                body = {"model": "tiny", "prompt": "x", "max_tokens": 20}
                running = asyncio.create_task(c.post("/v1/completions", json=body))
                await asyncio.sleep(0.1)
                drained = asyncio.create_task(app.state.lifecycle.drain(5))
                await asyncio.sleep(0)
                refused = await c.post("/v1/completions", json=body)
                health = await c.get("/health")
                return (
                    (await running).status_code,
                    refused.status_code,
                    await drained,
                    health.status_code,
                )

    assert asyncio.run(run()) == (200, 503, True, 200)


def test_adapters_dir_folder_changes_become_new_versions(
    client: TestClient, tmp_path: Path
) -> None:
    assert chat(client, "tiny:pirate").headers["x-adapter-version"] == "1"
    make_adapter(tmp_path / "adapters" / "pirate", seed=7)  # new weights in place
    r = chat(client, "tiny:pirate")
    assert r.headers["x-adapter-version"] == "2"
    assert chat(client, "tiny:pirate").headers["x-adapter-version"] == "2"


def test_chat_logprobs_in_openai_shape(client: TestClient) -> None:
    r = chat(client, "tiny:pirate", logprobs=True, top_logprobs=2, max_tokens=3)
    assert r.status_code == 200, r.text
    completion = ChatCompletion.model_validate(r.json())
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    tokens = [tokenizer().decode([t]) for t in reply_ids("pirate@1", 3)]
    assert [lp.token for lp in logprobs.content] == tokens
    for lp in logprobs.content:
        assert lp.bytes == list(lp.token.encode())
        assert len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token == lp.token  # the sampled token ranks first here


def test_n_choices_stream_each_reply(client: TestClient) -> None:
    body = {"model": "tiny:formal", "prompt": "x", "max_tokens": 4, "n": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    texts = ["", "", ""]
    finished = [None, None, None]
    for event in events[:-1]:
        assert isinstance(event, dict)
        for choice in event["choices"]:
            texts[choice["index"]] += choice["text"]
            finished[choice["index"]] = choice["finish_reason"] or finished[choice["index"]]
    assert texts == [reply("formal@1", 4)] * 3
    assert finished == ["length"] * 3


def test_engine_gets_the_adapter_and_a_unique_request_id(
    client: TestClient, engine: FakeEngine
) -> None:
    headers = {"x-request-id": "same"}
    for model in ("tiny:pirate", "tiny"):
        r = client.post(
            "/v1/completions",
            json={"model": model, "prompt": "x", "max_tokens": 1},
            headers=headers,
        )
        assert r.status_code == 200, r.text
    (first, lora), (second, none) = engine.requests
    assert first != second  # clients choose x-request-id; engine ids never collide
    handle = engine.loaded[0]
    assert (lora.lora_name, lora.lora_int_id) == (handle.engine_name, handle.lora_id)
    assert lora.lora_name.startswith("pirate@1+")  # the version, and its content digest
    assert none is None
    assert engine.priorities == [0, 0]  # no tenants: one priority for all


def test_responses_api(client: TestClient) -> None:
    from openai.types.responses import Response as OpenAIResponse

    r = client.post(
        "/v1/responses", json={"model": "pirate", "input": "hi", "max_output_tokens": 5}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-adapter"] == "pirate"
    response = OpenAIResponse.model_validate(r.json())
    assert response.model == "tiny:pirate"
    assert response.output_text == reply("pirate@1", 5)
    assert response.usage is not None and response.usage.output_tokens == 5


def test_responses_api_stream(client: TestClient) -> None:
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        kinds = [
            line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")
        ]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds


def test_tokenize_and_detokenize(client: TestClient) -> None:
    r = client.post("/tokenize", json={"model": "tiny:pirate", "prompt": "hello world"})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert tokens == prompt_ids("hello world")
    assert r.json()["max_model_len"] == 200
    r = client.post("/detokenize", json={"model": "tiny", "tokens": tokens})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == "hello world"
    assert client.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": HI, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ("/v1/chat/completions", {"messages": HI, "tools": []}, "tools"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/responses", {"input": "", "prompt": "hi"}, "prompt"),
    ],
)
def test_vllm_request_validation_is_400_naming_the_param(
    tmp_path: Path, path: str, body: dict[str, object], param: str
) -> None:
    app = create_app(tiny_settings(tmp_path), engine=FakeEngine())
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post(path, json={"model": "tiny", **body})
        assert r.status_code == 400, r.text
        err = error_of(r)
        assert (err["type"], err["param"]) == ("invalid_request_error", param)
        assert c.post(path, json={"model": "tiny", **body}).status_code == 400  # still up


@pytest.mark.parametrize("stream", [False, True])
def test_completion_echo_with_logprobs(client: TestClient, stream: bool) -> None:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 2, "echo": True}
    body |= {"logprobs": 1, "stream": stream}
    if stream:
        with client.stream("POST", "/v1/completions", json=body) as r:
            events = [e for e in sse_events(r) if isinstance(e, dict)]
        text = "".join(e["choices"][0]["text"] for e in events)
        tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    else:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        # Raw JSON: the first prompt token has no logprob (null, as OpenAI's legacy API
        # sends it), which the SDK's Completion type does not allow.
        choice = r.json()["choices"][0]
        assert choice["logprobs"]["token_logprobs"][0] is None
        text, tokens = choice["text"], choice["logprobs"]["tokens"]
    assert text == "hello world" + reply(None, 2)
    assert "".join(tokens) == text  # the prompt's tokens, then the reply's
