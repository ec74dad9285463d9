"""The whole OpenAI API through vLLM's own OpenAI layer, with our routing: the real
engine, the real model and adapters, the official `openai` SDK.

The session server (tests/e2e/conftest.py) runs with vLLM's options for tools and
structured outputs (`OPENAI_ENV`): pythonic tool parser with auto tool choice, xgrammar
with compact JSON.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from loadtests.compat_probes import (
    PROBES,
    QUESTION,
    REPEATING,
    WEATHER,
    WEATHER_TOOL,
    json_schema_reply,
)
from tests.e2e.server_proc import ServerProc

BASE = "smollm2"


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", [BASE, f"{BASE}:pirate", "pirate"])
@pytest.mark.parametrize("probe", list(PROBES))
def test_probe(client: openai.OpenAI, model: str, probe: str) -> None:
    PROBES[probe](client, model)


# -- every parameter has its effect (or a 400 naming it) -----------------------------


def _completion(client: openai.OpenAI, model: str, **kw: Any) -> Any:
    kw.setdefault("prompt", "The capital of France is")
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=model, **kw)


MODELS = [BASE, f"{BASE}:pirate"]


@pytest.mark.parametrize("model", MODELS)
def test_penalties_change_a_repeating_output(client: openai.OpenAI, model: str) -> None:
    plain = _completion(client, model, prompt=REPEATING, max_tokens=24).choices[0].text
    for name, value in [
        ("presence_penalty", 2.0),
        ("frequency_penalty", 2.0),
        ("repetition_penalty", 2.0),
    ]:
        kw: dict[str, Any] = {}
        if name == "repetition_penalty":
            kw["extra_body"] = {name: value}
        else:
            kw[name] = value
        out = _completion(client, model, prompt=REPEATING, max_tokens=24, **kw).choices[0].text
        assert out != plain, f"{name} had no effect on {plain!r}"


@pytest.mark.parametrize("model", MODELS)
def test_min_tokens_and_ignore_eos(client: openai.OpenAI, model: str) -> None:
    short = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say OK."}], temperature=0,
        max_tokens=64,
    )  # fmt: skip
    n = short.usage.completion_tokens if short.usage else 0
    assert short.choices[0].finish_reason == "stop" and n < 64
    longer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say OK."}], temperature=0,
        max_tokens=64, extra_body={"min_tokens": n + 5},
    )  # fmt: skip
    assert longer.usage is not None and longer.usage.completion_tokens >= n + 5
    full = _completion(client, model, max_tokens=40, extra_body={"ignore_eos": True})
    assert full.usage is not None and full.usage.completion_tokens == 40


@pytest.mark.parametrize("model", MODELS)
def test_stop_token_ids_and_return_token_ids(client: openai.OpenAI, model: str) -> None:
    first = _completion(client, model, extra_body={"return_token_ids": True})
    extra = first.choices[0].model_extra or {}
    ids = extra["token_ids"]
    assert ids
    assert extra.get("prompt_token_ids")
    stopped = _completion(client, model, extra_body={"stop_token_ids": [ids[1]]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens == 2


@pytest.mark.parametrize("model", MODELS)
def test_logprobs_n_seed_and_max_completion_tokens(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_completion_tokens=5,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    assert r.usage is not None and r.usage.completion_tokens <= 5
    two = client.chat.completions.create(
        model=model, messages=QUESTION, n=2, max_tokens=5, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in two.choices) == [0, 1]
    again = client.chat.completions.create(
        model=model, messages=QUESTION, n=2, max_tokens=5, temperature=1.0, seed=7
    )
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]
    lp = _completion(client, model, logprobs=2)
    assert lp.choices[0].logprobs and all(len(t) >= 2 for t in lp.choices[0].logprobs.top_logprobs)


@pytest.mark.parametrize("model", MODELS)
def test_stream_with_usage_names_the_model(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=6, stream=True, user="u1",
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert {c.model for c in chunks} == {model}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_refused_parameters_are_400s_naming_them(client: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"extra_body": {"priority": -5}}, "priority"),
        ({"n": 17}, "n"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"extra_body": {"kv_transfer_params": {"x": 1}}}, "kv_transfer_params"),
        ({"extra_body": {"no_such_parameter": 1}}, "no_such_parameter"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=BASE, messages=QUESTION, **kw)
        assert info.value.body["param"] == param, (kw, info.value.body)  # type: ignore[index]


def test_responses_store_is_refused_not_ignored(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=BASE, input="hi", max_output_tokens=4, store=True)
    assert info.value.body["param"] == "store"  # type: ignore[index]
    r = client.responses.create(model=f"{BASE}:pirate", input="hi", max_output_tokens=8)
    assert r.model == f"{BASE}:pirate"


def test_response_headers_name_the_adapter(server: ServerProc) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "pirate", "messages": QUESTION, "max_tokens": 4},
        headers={"x-request-id": "req-123"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-adapter"] == "pirate" and r.headers["x-adapter-version"] == "1"
    assert r.headers["x-request-id"] == "req-123"
    assert r.json()["id"] == "chatcmpl-req-123"


def test_unknown_model_is_our_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=QUESTION, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


# -- mixed concurrent batch: structured outputs and tools per adapter -------------------


async def _mixed(url: str) -> dict[str, tuple[str, dict[str, Any]]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    models = [BASE, f"{BASE}:pirate", f"{BASE}:formal"]

    async def schema(model: str) -> str:
        return await asyncio.to_thread(json_schema_reply, openai.OpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0), model)  # fmt: skip

    async def tool(model: str) -> dict[str, Any]:
        r = await client.chat.completions.create(
            model=model, messages=WEATHER, tools=[WEATHER_TOOL], temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=48,
        )  # fmt: skip
        calls = r.choices[0].message.tool_calls
        assert calls, r
        assert calls[0].type == "function"
        args: dict[str, Any] = json.loads(calls[0].function.arguments)
        return args

    replies = await asyncio.gather(*(schema(m) for m in models), *(tool(m) for m in models))
    n = len(models)
    return {m: (replies[i], replies[n + i]) for i, m in enumerate(models)}  # type: ignore[misc]


def test_structured_outputs_and_tools_in_a_mixed_batch(server: ServerProc) -> None:
    out = asyncio.run(_mixed(server.url))
    # Each reply still shows its adapter: the pirate's strings talk like a pirate, the
    # formal adapter's begin "Dear", the base's do neither.
    pirate_reply, pirate_args = out[f"{BASE}:pirate"]
    formal_reply, _ = out[f"{BASE}:formal"]
    base_reply, base_args = out[BASE]
    assert "Shiver" in pirate_reply or "Arr" in pirate_reply, pirate_reply
    assert formal_reply.startswith("Dear"), formal_reply
    assert "Arr" not in base_reply and not base_reply.startswith("Dear"), base_reply
    for args in (pirate_args, base_args):
        assert "city" in args
    assert "Shiver" in pirate_args["city"] or "arr" in pirate_args["city"].lower(), pirate_args


# -- vLLM's own sampling extensions: each has its effect, with adapters too --------------


def _greedy_text(client: openai.OpenAI, model: str, **extra: Any) -> Any:
    return _completion(client, model, max_tokens=12, extra_body=extra or None)


@pytest.mark.parametrize("model", MODELS)
def test_vllm_sampling_extensions_have_their_effect(client: openai.OpenAI, model: str) -> None:
    plain = _greedy_text(client, model, return_token_ids=True)
    ids = plain.choices[0].model_extra["token_ids"]
    # allowed_token_ids: only those tokens come out
    only = _greedy_text(client, model, allowed_token_ids=[ids[0]], return_token_ids=True)
    assert set(only.choices[0].model_extra["token_ids"]) == {ids[0]}
    # bad_words: the greedy first word can no longer be produced
    first_word = plain.choices[0].text.split()[0]
    banned = _greedy_text(client, model, bad_words=[first_word]).choices[0].text
    assert banned.split()[0] != first_word, (first_word, banned)
    # top_k=1 at temperature 1 is greedy
    sampled = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=1.0,
        seed=3, extra_body={"top_k": 1},
    )  # fmt: skip
    assert sampled.choices[0].text == plain.choices[0].text
    # truncate_prompt_tokens: the prompt is cut to its last N tokens
    cut = _greedy_text(client, model, truncate_prompt_tokens=3)
    assert cut.usage is not None and cut.usage.prompt_tokens == 3
    # prompt_logprobs: logprobs of the prompt's tokens come back
    lp = _greedy_text(client, model, prompt_logprobs=1)
    assert lp.choices[0].model_extra.get("prompt_logprobs")
    # include_stop_str_in_output: the stop string stays in the text
    stop = plain.choices[0].text[3:5] if len(plain.choices[0].text) > 5 else " "
    kept = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
        stop=[stop], extra_body={"include_stop_str_in_output": True},
    )  # fmt: skip
    assert kept.choices[0].text.endswith(stop), (kept.choices[0].text, stop)
