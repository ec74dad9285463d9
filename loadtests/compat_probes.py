"""OpenAI-compatibility probes: one user-visible feature each, run with the official
`openai` SDK against any OpenAI-compatible server and model name.

The same probes serve the e2e tests (tests/e2e/test_openai_full.py) and the
compatibility benchmark (loadtests/compat.py, plain `vllm serve` against ours), so both
judge the same thing. A probe returns a short note on success and raises AssertionError
(or the SDK's error) on failure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam

Probe = Callable[[openai.OpenAI, str], str]

# A schema small enough for a 135M model to fill in a few tokens (the string is bounded,
# so an adapter that keeps talking cannot run past max_tokens inside it).
REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"reply": {"type": "string", "maxLength": 40}},
    "required": ["reply"],
    "additionalProperties": False,
}
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
WEATHER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris?"}
]


def _chat(client: openai.OpenAI, model: str, **kw: Any) -> Any:
    kw.setdefault("messages", QUESTION)
    kw.setdefault("max_tokens", 48)
    return client.chat.completions.create(model=model, temperature=0, **kw)


def json_schema_reply(client: openai.OpenAI, model: str) -> str:
    """The reply of `response_format=json_schema`, parsed and checked against the schema."""
    r = _chat(
        client,
        model,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": REPLY_SCHEMA, "strict": True},
        },
    )
    data = json.loads(r.choices[0].message.content or "")
    assert set(data) == {"reply"}, data
    assert isinstance(data["reply"], str), data
    assert len(data["reply"]) <= 40, data
    return str(data["reply"])


def probe_json_schema(client: openai.OpenAI, model: str) -> str:
    return json.dumps(json_schema_reply(client, model))


def probe_json_object(client: openai.OpenAI, model: str) -> str:
    r = _chat(
        client,
        model,
        messages=[{"role": "user", "content": "Answer in JSON: what is the capital of France?"}],
        response_format={"type": "json_object"},
        max_tokens=64,
    )
    data = json.loads(r.choices[0].message.content or "")
    assert isinstance(data, (dict, list)), data
    return type(data).__name__


def _tool_arguments(r: Any) -> dict[str, Any]:
    calls = r.choices[0].message.tool_calls
    assert calls, f"no tool_calls; content={r.choices[0].message.content!r}"
    assert calls[0].function.name == "get_weather", calls[0]
    args = json.loads(calls[0].function.arguments)
    assert isinstance(args, dict), args
    assert "city" in args, args
    return args


def probe_named_tool(client: openai.OpenAI, model: str) -> str:
    r = _chat(
        client,
        model,
        messages=WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    return json.dumps(_tool_arguments(r))


def probe_required_tool(client: openai.OpenAI, model: str) -> str:
    # One call: with parallel calls allowed a small model may repeat the call until
    # max_tokens (the array has no bound then).
    r = _chat(
        client,
        model,
        messages=WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    return json.dumps(_tool_arguments(r))


def probe_tool_conversation(client: openai.OpenAI, model: str) -> str:
    """An assistant turn with tool_calls and a `tool` result turn are accepted."""
    messages = [
        *WEATHER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
    ]
    r = _chat(client, model, messages=messages, tools=[WEATHER_TOOL], max_tokens=16)
    assert r.choices[0].message.content is not None or r.choices[0].message.tool_calls
    return r.choices[0].finish_reason or ""


def _first_token(client: openai.OpenAI, model: str, **kw: Any) -> int:
    r = client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=1,
        temperature=0,
        extra_body={"return_token_ids": True},
        **kw,
    )
    ids = r.choices[0].model_extra.get("token_ids") if r.choices[0].model_extra else None
    assert ids, "no token_ids in the choice (return_token_ids)"
    return int(ids[0])


def probe_logit_bias(client: openai.OpenAI, model: str) -> str:
    first = _first_token(client, model)
    other = _first_token(client, model, logit_bias={str(first): -100})
    assert other != first, f"logit_bias -100 on {first} left it first"
    return f"{first} -> {other}"


REPEATING = "Repeat these words forever: apple apple apple apple apple apple apple apple"


def probe_penalty(client: openai.OpenAI, model: str) -> str:
    """A greedy output that repeats itself changes under frequency_penalty."""

    def text(**kw: Any) -> str:
        r = client.completions.create(
            model=model, prompt=REPEATING, max_tokens=24, temperature=0, **kw
        )
        return str(r.choices[0].text)

    plain, penalised = text(), text(frequency_penalty=2.0)
    assert plain != penalised, f"frequency_penalty had no effect: {plain!r}"
    return f"{plain[:20]!r} -> {penalised[:20]!r}"


def probe_echo(client: openai.OpenAI, model: str) -> str:
    prompt = "Once upon a time"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=4, echo=True)
    assert r.choices[0].text.startswith(prompt), r.choices[0].text
    return repr(r.choices[0].text)


def probe_prompt_list(client: openai.OpenAI, model: str) -> str:
    r = client.completions.create(model=model, prompt=["Hello", "Goodbye"], max_tokens=4)
    assert sorted(c.index for c in r.choices) == [0, 1], r.choices
    return f"{len(r.choices)} choices"


def probe_responses(client: openai.OpenAI, model: str) -> str:
    r = client.responses.create(model=model, input="Say hello.", max_output_tokens=16)
    assert r.output_text, r
    return repr(r.output_text[:30])


def probe_models_retrieve(client: openai.OpenAI, model: str) -> str:
    m = client.models.retrieve(model)
    assert m.id == model or m.id.endswith(f":{model}"), m.id
    return m.id


def probe_tokenize(client: openai.OpenAI, model: str) -> str:
    root = str(client.base_url).rstrip("/").removesuffix("/v1")
    text = "Hello, world!"
    tokens = httpx.post(f"{root}/tokenize", json={"model": model, "prompt": text}).json()
    assert tokens.get("tokens"), tokens
    back = httpx.post(f"{root}/detokenize", json={"model": model, "tokens": tokens["tokens"]})
    assert back.json().get("prompt") == text, back.text
    return f"{len(tokens['tokens'])} tokens"


PROBES: dict[str, Probe] = {
    "json_schema": probe_json_schema,
    "json_object": probe_json_object,
    "tool_choice named": probe_named_tool,
    "tool_choice required": probe_required_tool,
    "tool result turn": probe_tool_conversation,
    "logit_bias": probe_logit_bias,
    "frequency_penalty": probe_penalty,
    "echo": probe_echo,
    "prompt list": probe_prompt_list,
    "responses.create": probe_responses,
    "models.retrieve": probe_models_retrieve,
    "tokenize/detokenize": probe_tokenize,
}


def run_probe(client: openai.OpenAI, model: str, name: str) -> tuple[bool, str]:
    """(passed, note) for one probe; never raises."""
    try:
        return True, PROBES[name](client, model)
    except Exception as exc:  # a failed probe is a result, not a crash
        return False, f"{type(exc).__name__}: {str(exc)[:160]}"
