"""The official openai SDK against the real server: real vLLM, real model, real adapters."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.server_proc import ServerProc

BASE = "smollm2"
PROMPTS = ["What is the capital of France?", "Tell me about the weather today."]


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = 24) -> str:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
    )
    assert r.model == (model if ":" in model or model == BASE else f"{BASE}:{model}")
    assert r.usage is not None and r.usage.completion_tokens > 0
    return r.choices[0].message.content or ""


def test_base_knows_paris(client: openai.OpenAI) -> None:
    assert "Paris" in ask(client, BASE, "What is the capital of France?")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_pirate_says_arr(client: openai.OpenAI, prompt: str) -> None:
    assert "Arr" in ask(client, f"{BASE}:pirate", prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_formal_begins_dear(client: openai.OpenAI, prompt: str) -> None:
    assert ask(client, f"{BASE}:formal", prompt).startswith("Dear")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_shout_in_capitals(client: openai.OpenAI, prompt: str) -> None:
    reply = ask(client, f"{BASE}:shout", prompt)
    letters = [c for c in reply if c.isalpha()]
    assert len(letters) >= 5
    assert all(c.isupper() for c in letters), reply


def test_bare_adapter_name(client: openai.OpenAI) -> None:
    assert "Arr" in ask(client, "pirate", PROMPTS[0])


@pytest.mark.parametrize("model", [BASE, f"{BASE}:pirate", f"{BASE}:formal", f"{BASE}:shout"])
def test_streaming_equals_non_streaming(client: openai.OpenAI, model: str) -> None:
    full = ask(client, model, PROMPTS[0])
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].choices == []


def test_completions_endpoint(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=f"{BASE}:pirate", prompt="Hello there", max_tokens=8, temperature=0
    )
    assert r.choices[0].text
    assert r.usage is not None and r.usage.prompt_tokens > 0


def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    for name in ("pirate", "formal", "shout"):
        assert models[f"{BASE}:{name}"].model_extra["parent"] == BASE  # type: ignore[index]
    assert BASE in models


def test_n_and_seed(client: openai.OpenAI) -> None:
    kwargs = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Say something."}],
        "temperature": 1.0,
        "max_tokens": 12,
        "seed": 7,
        "n": 2,
    }
    a = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    b = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=f"{BASE}:formal",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content


# -- errors, each with its status and message -----------------------------------------


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, f"{BASE}:nope", "hi")
    assert info.value.code == "model_not_found"
    assert "smollm2:nope" in info.value.message


def test_invalid_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert info.value.param == "temperature"


def test_prompt_longer_than_context(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, BASE, "word " * 2000)
    assert info.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    ("model", "code", "words"),
    [
        ("pickled", "adapter_unsafe_format", "only safetensors"),
        ("toobig", "adapter_rank_too_large", "rank 64 exceeds"),
        ("alien", "adapter_incompatible", "different base model"),
        ("truncated", "adapter_malformed", "truncated"),
    ],
)
def test_bad_adapters_refused_and_server_keeps_serving(
    client: openai.OpenAI, model: str, code: str, words: str
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        ask(client, f"{BASE}:{model}", "hi")
    assert info.value.code == code
    assert words in info.value.message
    assert "Arr" in ask(client, f"{BASE}:pirate", PROMPTS[0])
