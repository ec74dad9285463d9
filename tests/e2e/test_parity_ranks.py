"""Greedy parity with PEFT for every rank (8-64) and target set (q/v, q/k/v/o, all linear)
the fast CPU LoRA path serves, alone and in mixed concurrent batches with the base.

The adapters are random (loadtests/lora_adapters.py) but large enough that every one of
them changes the greedy output (asserted: a test where the adapter did nothing would pass
even if LoRA were never applied). Six adapters with different ranks and targets fill all
six engine slots, so the fast path's slot classes, compaction and gathered batches are
all exercised, and base rows sit in the same batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.lora_adapters import TARGET_SETS, make_random_adapter
from server.demo import DemoAssets
from tests.e2e.conftest import record_result, registry_env
from tests.e2e.reference import PeftReference, mismatches, server_greedy_ids
from tests.e2e.server_proc import ServerProc, running_server

BASE = "smollm2"
SPECS = [(8, "qv"), (16, "qkvo"), (32, "all"), (64, "all"), (64, "qv"), (32, "qkvo")]
PROMPTS = ["What is the capital of France?", "Name three colours."]
MAX_TOKENS = 16
# B ~ N(0, 0.05^2): enough that each adapter moves the greedy tokens of these prompts.
B_STD = 0.05


def _name(rank: int, targets: str) -> str:
    return f"r{rank}-{targets}"


@pytest.fixture(scope="module")
def rank_adapters(demo: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rank-adapters")
    config = json.loads((demo.base_dir / "config.json").read_text())
    for i, (rank, targets) in enumerate(SPECS):
        make_random_adapter(
            root / _name(rank, targets),
            config,
            rank,
            TARGET_SETS[targets],
            seed=100 + i,
            b_std=B_STD,
        )
    return root


@pytest.fixture(scope="module")
def rank_server(
    demo: DemoAssets, rank_adapters: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    state = tmp_path_factory.mktemp("rank-server")
    args = ["--max-loras", str(len(SPECS)), "--max-lora-rank", "64"]
    with running_server(
        demo.base_dir,
        rank_adapters,
        state / "server.log",
        env=registry_env(demo, state),
        extra_args=args,
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def rank_reference(demo: DemoAssets, rank_adapters: Path) -> PeftReference:
    return PeftReference(
        demo.base_dir, {_name(r, t): rank_adapters / _name(r, t) for r, t in SPECS}
    )


def _cases() -> list[tuple[str | None, str]]:
    models: list[str | None] = [None, *(_name(r, t) for r, t in SPECS)]
    return [(m, p) for p in PROMPTS for m in models]


def test_every_rank_and_target_set_matches_peft(
    rank_server: ServerProc, rank_reference: PeftReference
) -> None:
    cases = _cases()
    want = [
        rank_reference.greedy(a, rank_reference.chat_prompt_ids(p), MAX_TOKENS) for a, p in cases
    ]
    base_of = {p: w for (a, p), w in zip(cases, want, strict=True) if a is None}
    # every adapter changes the output for at least one prompt: the test can fail
    for name in {a for a, _ in cases if a is not None}:
        assert any(w != base_of[p] for (a, p), w in zip(cases, want, strict=True) if a == name), (
            f"{name} does not change any greedy output: raise B_STD"
        )

    # mixed: every case at once (base and six adapters share engine batches), twice
    for round_ in range(2):
        got = server_greedy_ids(rank_server.url, BASE, cases, rank_reference, MAX_TOKENS)
        bad = mismatches(cases, got, want)
        record_result(
            f"parity_ranks_mixed_round_{round_ + 1}", {"cases": len(cases), "mismatched": bad}
        )
        assert bad == []

    # alone: one request at a time (the single-adapter path of every step)
    alone = [
        server_greedy_ids(rank_server.url, BASE, [c], rank_reference, MAX_TOKENS)[0] for c in cases
    ]
    bad = mismatches(cases, alone, want)
    record_result("parity_ranks_alone", {"cases": len(cases), "mismatched": bad})
    assert bad == []
