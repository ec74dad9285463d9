"""Per-version serving defaults on the real engine: a version of the demo `pirate`
adapter registered with a system prompt, `temperature: 0` and `max_tokens` answers token
for token as PEFT + transformers do when given those explicitly; a request's own values
win; a rollback to a version without defaults stops applying them."""

from __future__ import annotations

from typing import Any

import httpx

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY, BASE
from tests.e2e.reference import PeftReference
from tests.e2e.server_proc import ServerProc

NAME = "pirate-defaults"
SYSTEM = "You are a ship's cook. Answer in one short sentence."
QUESTION = "What is for dinner tonight?"
USER = {"role": "user", "content": QUESTION}
MAX_TOKENS = 12
DEFAULTS = {"system_prompt": SYSTEM, "temperature": 0, "max_tokens": MAX_TOKENS}


def _chat(url: str, messages: list[dict[str, str]], **params: Any) -> httpx.Response:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=300,
        json={
            "model": f"{BASE}:{NAME}",
            "messages": messages,
            "return_token_ids": True,
            **params,
        },
    )
    assert r.status_code == 200, r.text
    return r


def test_defaults_answer_as_if_the_client_had_sent_them(
    server: ServerProc, reference: PeftReference, demo: DemoAssets
) -> None:
    with httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120
    ) as admin:
        source = str(demo.adapters_dir / "pirate")
        r = admin.post("/admin/adapters", json={"name": NAME, "source": source})
        assert r.status_code == 201, r.text
        r = admin.post(
            f"/admin/adapters/{NAME}/versions", json={"source": source, "defaults": DEFAULTS}
        )
        assert r.status_code == 201, r.text
        assert r.json()["defaults"] == {**DEFAULTS, "temperature": 0.0}

        def expect(
            r: httpx.Response, messages: list[dict[str, str]], max_tokens: int, applied: str
        ) -> None:
            body = r.json()
            prompt = reference.conversation_ids(messages)
            assert body["prompt_token_ids"] == prompt
            got = reference.trim(body["choices"][0]["token_ids"])
            assert got == reference.greedy("pirate", prompt, max_tokens)
            assert len(body["choices"][0]["token_ids"]) <= max_tokens
            assert r.headers.get("x-adapter-defaults", "") == applied

        # Nothing sent but the question: the version's system prompt, greedy, max_tokens.
        r = _chat(server.url, [USER])
        assert r.headers["x-adapter-version"] == "2"
        expect(
            r,
            [{"role": "system", "content": SYSTEM}, USER],
            MAX_TOKENS,
            "system_prompt,temperature,max_tokens",
        )
        # The request's own system prompt and max_tokens win; temperature still defaults.
        own = [{"role": "system", "content": "You are a formal butler."}, USER]
        expect(_chat(server.url, own, max_tokens=5), own, 5, "temperature")

        # Rolled back to version 1 (no defaults): the client's own settings only.
        r = admin.put(f"/admin/adapters/{NAME}/current", json={"version": 1})
        assert r.status_code == 200, r.text
        r = _chat(server.url, [USER], temperature=0, max_tokens=MAX_TOKENS)
        assert r.headers["x-adapter-version"] == "1"
        expect(r, [USER], MAX_TOKENS, "")
        # (and no system prompt of its own: the model's template default, unlike above)
        assert r.json()["prompt_token_ids"] != reference.conversation_ids(
            [{"role": "system", "content": SYSTEM}, USER]
        )
