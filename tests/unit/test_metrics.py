"""Metrics and request logs, through the real app with a fake engine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.metrics import OTHER, Metrics, RequestInfo
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine, prompt_ids


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    make_base(tmp_path / "base")
    make_adapter(tmp_path / "adapters" / "pirate")
    settings = Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        adapters_dir=tmp_path / "adapters",
        home=tmp_path / "home",
    )
    return TestClient(create_app(settings, engine=FakeEngine()))


def test_request_metrics_and_log_line(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with client, caplog.at_level(logging.INFO, logger="loraswap.requests"):
        body = {"model": "tiny:pirate", "prompt": "hello", "max_tokens": 4}
        r = client.post("/v1/completions", json=body, headers={"x-request-id": "req-1"})
        assert r.status_code == 200
        assert client.post("/v1/completions", json={**body, "model": "nope"}).status_code == 404
        # Time to first token is seen in streams (a non-streaming answer comes whole).
        stream = {**body, "model": "tiny", "stream": True}
        headers = {"x-request-id": "req-2"}
        with client.stream("POST", "/v1/completions", json=stream, headers=headers) as r:
            assert r.status_code == 200
            assert r.read().endswith(b"data: [DONE]\n\n")
        text = client.get("/metrics").text
    ok = metric_lines(text, "loraswap_requests_total{")
    assert any(
        'adapter="pirate"' in line
        and 'version="1"' in line
        and 'status="200"' in line
        and line.endswith(" 1.0")
        for line in ok
    ), ok
    assert any('status="404"' in line for line in ok)
    assert any(
        line.endswith(" 4.0")
        for line in metric_lines(text, 'loraswap_completion_tokens_total{adapter="pirate"')
    )
    assert metric_lines(text, "loraswap_time_to_first_token_seconds_count")
    assert metric_lines(text, "loraswap_adapter_loads_total")[0].endswith(" 1.0")
    assert metric_lines(text, "loraswap_adapters_resident")[-1].endswith(" 1.0")
    info = metric_lines(text, "vllm:lora_requests_info{")
    assert len(info) == 1 and 'max_lora="4"' in info[0]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "loraswap.requests"]
    first = next(line for line in lines if line["request_id"] == "req-1")
    assert (first["adapter"], first["version"], first["status"]) == ("pirate", "1", 200)
    assert first["prompt_tokens"] == len(prompt_ids("hello"))
    assert first["completion_tokens"] == 4
    assert "latency_ms" in first
    streamed = next(line for line in lines if line["request_id"] == "req-2")
    assert streamed["completion_tokens"] == 4
    assert 0 < streamed["ttft_ms"] <= streamed["latency_ms"]


def test_label_cardinality_is_bounded() -> None:
    metrics = Metrics(max_label_values=3)
    for i in range(1000):
        metrics.observe(
            RequestInfo(
                request_id="r",
                method="POST",
                path="/v1/completions",
                started=0,
                ended=1,
                status=200,
                adapter=f"a{i}",
                version="1",
            )
        )
    text = metrics.registry
    samples = {
        s.labels["adapter"]
        for m in text.collect()
        for s in m.samples
        if m.name == "loraswap_requests"
    }
    assert samples == {"a0", "a1", "a2", OTHER}
