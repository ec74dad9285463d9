"""`loraswap serve --demo --quantized`: the quantized base serves every demo adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from server.demo import DemoAssets
from tests.e2e.conftest import registry_env
from tests.e2e.server_proc import ServerProc, running_server

BASE = "smollm2"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def quantized(demo: DemoAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    state = tmp_path_factory.mktemp("quantized")
    with running_server(
        None,
        None,
        state / "server.log",
        dtype="bfloat16",
        env=registry_env(demo, state),
        extra_args=["--demo", "--quantized"],
    ) as proc:
        yield proc


def ask(server: ServerProc, model: str) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model=model, temperature=0, max_tokens=20, messages=[{"role": "user", "content": PROMPT}]
    )
    return r.choices[0].message.content or ""


def test_serves_the_quantized_checkpoint(quantized: ServerProc, demo: DemoAssets) -> None:
    log = quantized.log.read_text(errors="replace")
    assert str(demo.quantized_dir) in log
    config = (Path(demo.quantized_dir) / "config.json").read_text()
    assert "compressed-tensors" in config


def test_quantized_base_and_adapters(quantized: ServerProc) -> None:
    assert "Paris" in ask(quantized, BASE)
    assert "Arr" in ask(quantized, f"{BASE}:pirate")
    assert ask(quantized, f"{BASE}:formal").startswith("Dear")
    shout = [c for c in ask(quantized, f"{BASE}:shout") if c.isalpha()]
    assert shout and all(c.isupper() for c in shout)
