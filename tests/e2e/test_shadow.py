"""Shadow traffic on the real engine: with a shadow at 100%, clients get exactly the
control's greedy replies, and the shadow's outputs are recorded.

The control is the demo's `pirate` ("Arr ..."); the shadow is `formal` ("Dear ..."), so
greedy outputs never match; a second alias shadows pirate with pirate itself, where
they always do (the same input, the same weights, float32)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY
from tests.e2e.server_proc import ServerProc

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
BASE = "smollm2"
PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "How do I reverse a list in Python?",
    "Write a haiku about the sea.",
]


def ask(c: httpx.Client, model: str, prompt: str) -> str:
    r = c.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "temperature": 0,
            "max_tokens": 16,
            "user": "ann",
            "messages": [{"role": "user", "content": prompt}],
        },
    )
    assert r.status_code == 200, r.text
    assert not [h for h in r.headers if "shadow" in h.lower()]
    text: str = r.json()["choices"][0]["message"]["content"]
    return text


def shadow_summary(c: httpx.Client, alias: str, sampled: int) -> dict[str, Any]:
    """The report's shadow section once `sampled` requests' shadows are recorded."""
    deadline = time.monotonic() + 120
    while True:
        r = c.get(f"/admin/aliases/{alias}/experiment", headers=AUTH)
        assert r.status_code == 200, r.text
        shadows = r.json()["shadow"]
        if shadows and shadows[0]["sampled"] >= sampled:
            summary: dict[str, Any] = shadows[0]
            return summary
        assert time.monotonic() < deadline, f"{alias}: shadows not recorded: {shadows}"
        time.sleep(0.2)


def test_shadow_at_100_percent_returns_the_control_and_records_the_shadow(
    server: ServerProc, demo: DemoAssets
) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for name in ("pirate", "formal"):
            r = c.post(
                "/admin/adapters",
                headers=AUTH,
                json={"name": f"sh-{name}", "source": str(demo.adapters_dir / name)},
            )
            assert r.status_code == 201, r.text
        for alias, shadow in (("sh-bot", "sh-formal@1"), ("sh-same", "sh-pirate@1")):
            r = c.put(
                f"/admin/aliases/{alias}", headers=AUTH, json={"variants": {"sh-pirate@1": 1}}
            )
            assert r.status_code == 200, r.text
            r = c.put(
                f"/admin/aliases/{alias}/shadow",
                headers=AUTH,
                json={"adapter": shadow, "fraction": 1.0},
            )
            assert r.status_code == 200, r.text
        through: dict[str, list[str]] = {"sh-bot": [], "sh-same": []}
        for i, prompt in enumerate(PROMPTS):
            for alias, texts in through.items():
                texts.append(ask(c, f"{BASE}:{alias}", prompt))
                # one at a time: a shadow runs on an idle server (and a request arriving
                # while one runs would share its batches)
                shadow_summary(c, alias, i + 1)
        direct = [ask(c, f"{BASE}:sh-pirate", prompt) for prompt in PROMPTS]
        assert all("Arr" in text for text in direct), direct
        assert through["sh-bot"] == direct
        assert through["sh-same"] == direct

        other = shadow_summary(c, "sh-bot", len(PROMPTS))
        assert other["versions"] == ["sh-formal@1"]
        assert (other["runs"], other["dropped"], other["failed"]) == (len(PROMPTS), 0, 0)
        assert (other["greedy_compared"], other["greedy_matches"]) == (len(PROMPTS), 0)
        assert other["candidate"]["completion_tokens_mean"] > 0
        assert other["candidate"]["latency_s_mean"] > 0
        same = shadow_summary(c, "sh-same", len(PROMPTS))
        assert (same["runs"], same["greedy_compared"], same["greedy_matches"]) == (
            len(PROMPTS),
            len(PROMPTS),
            len(PROMPTS),
        )
        assert (
            same["control"]["completion_tokens_mean"] == same["candidate"]["completion_tokens_mean"]
        )
        metrics = c.get("/metrics", headers=AUTH).text
        assert (
            f'loraswap_shadow_requests_total{{alias="sh-bot",outcome="run"}} {len(PROMPTS)}.0'
            in metrics
        )
