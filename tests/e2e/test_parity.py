"""Greedy outputs through our server equal PEFT + transformers token for token, with base
and adapter requests sent together so that they share engine batches.

This is the test that catches vLLM 0.32's CPU multi-LoRA bug (base tokens batched beside
LoRA tokens get the last adapter slot): test_parity_fails_without_the_fix proves it does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.demo import DemoAssets
from tests.e2e.conftest import MAX_LORAS, record_result, registry_env
from tests.e2e.reference import PeftReference, mismatches, server_greedy_ids
from tests.e2e.server_proc import ServerProc, running_server

BASE = "smollm2"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
]
MAX_TOKENS = 24


def _cases(adapter_names: tuple[str, ...]) -> list[tuple[str | None, str]]:
    models: list[str | None] = [None, *adapter_names]
    return [(m, p) for p in PROMPTS for m in models]


def _server_outputs(
    url: str, cases: list[tuple[str | None, str]], trim: PeftReference
) -> list[list[int]]:
    return server_greedy_ids(url, BASE, cases, trim, MAX_TOKENS)


@pytest.fixture(scope="module")
def expected(reference: PeftReference, demo: DemoAssets) -> list[list[int]]:
    return [
        reference.greedy(a, reference.chat_prompt_ids(p), MAX_TOKENS)
        for a, p in _cases(demo.adapter_names)
    ]


def test_parity_mixed_concurrent_batch(
    server: ServerProc, reference: PeftReference, demo: DemoAssets, expected: list[list[int]]
) -> None:
    cases = _cases(demo.adapter_names)
    # Twice: the second round hits adapters already resident in the engine.
    for round_ in range(2):
        got = _server_outputs(server.url, cases, reference)
        bad = mismatches(cases, got, expected)
        record_result(
            f"parity_fix_on_round_{round_ + 1}", {"cases": len(cases), "mismatched": len(bad)}
        )
        assert bad == []
    assert all(len(w) > 0 for w in expected)


def test_parity_fails_without_the_fix(
    demo: DemoAssets,
    adapters_dir: Path,
    reference: PeftReference,
    expected: list[list[int]],
    tmp_path: Path,
) -> None:
    """The canary: with our plugin switched off, upstream's bug shows in the same test.

    If this starts failing, either the switch no longer turns the fix off, or upstream
    vLLM fixed the bug (then the plugin's probe keeps it inert; retire this test)."""
    env = {**registry_env(demo, tmp_path), "LORASWAP_ENGINE__LORA_FIX": "false"}
    with running_server(
        demo.base_dir, adapters_dir, tmp_path / "server.log", env=env, extra_args=MAX_LORAS
    ) as srv:
        cases = _cases(demo.adapter_names)
        got = _server_outputs(srv.url, cases, reference)
    bad = mismatches(cases, got, expected)
    record_result(
        "parity_fix_off", {"cases": len(cases), "mismatched": len(bad), "mismatches": bad}
    )
    assert bad, "outputs matched PEFT with the fix off: is the switch still effective?"
    # The bug hits base requests (index -1); adapter requests stay correct.
    assert all(line.startswith("base") for line in bad), bad
