"""What vLLM's OpenAI layer would accept but not honour here is a 400 naming it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.fakes import FakeEngine
from tests.unit.test_api import tiny_settings

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_settings(tmp_path), engine=FakeEngine())) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "body", "headers", "param"),
    [
        ("/v1/chat/completions", {**CHAT, "no_such_parameter": 1}, {}, "no_such_parameter"),
        ("/v1/chat/completions", {**CHAT, "priority": -3}, {}, "priority"),
        (
            "/v1/chat/completions",
            {**CHAT, "kv_transfer_params": {"a": 1}},
            {},
            "kv_transfer_params",
        ),
        ("/v1/chat/completions", {**CHAT, "n": 17}, {}, "n"),
        ("/v1/chat/completions", {**CHAT, "stop": list("abcde")}, {}, "stop"),
        ("/v1/chat/completions", CHAT, {"x-vllm-priority": "-9"}, None),
        ("/v1/responses", {"model": "tiny", "input": "hi", "store": True}, {}, "store"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 17}, {}, "prompt"),
    ],
)
def test_refused(
    client: TestClient,
    path: str,
    body: dict[str, object],
    headers: dict[str, str],
    param: str | None,
) -> None:
    r = client.post(path, json=body, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_an_implicit_store_is_served(client: TestClient) -> None:
    r = client.post("/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny"
