"""Lifecycle on the real engine: client disconnects abort, SIGTERM drains, engine death.

Figures (abort latency, drain time, time to 503 after engine death) are written to
build/results/lifecycle.json.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY, record_result, registry_env
from tests.e2e.server_proc import running_server

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
LONG = {
    "model": "smollm2:pirate",
    "ignore_eos": True,
    "max_tokens": 400,
    "temperature": 1.0,
    "messages": [{"role": "user", "content": "Tell me a very long story."}],
}


def engine_running(url: str) -> int:
    return int(httpx.get(f"{url}/admin/engine", headers=AUTH).json()["engine_running_requests"])


def wait_for(predicate, timeout: float) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if predicate():
            return time.perf_counter() - start
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def test_disconnects_abort_then_sigterm_drains(
    demo: DemoAssets, adapters_dir: Path, tmp_path: Path
) -> None:
    env = registry_env(demo, tmp_path)
    with running_server(
        demo.base_dir, adapters_dir, tmp_path / "s.log", env=env, dtype="bfloat16"
    ) as srv:
        url = srv.url
        # Streaming: leave after the first chunk.
        with (
            httpx.Client(timeout=60) as c,
            c.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}) as r,
        ):
            lines = r.iter_lines()  # keep it referenced: a dropped iterator closes the stream
            next(lines)
            wait_for(lambda: engine_running(url) == 1, 10)
        # The stream is closed: from here until the engine lets the request go.
        stream_abort = wait_for(lambda: engine_running(url) == 0, 5)
        assert stream_abort < 1.0

        # Non-streaming: the client gives up (read timeout) while the engine works.
        with httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as c:
            try:
                c.post(f"{url}/v1/chat/completions", json=LONG)
                raise AssertionError("a 400-token reply came back within 1 s")
            except httpx.ReadTimeout:
                pass
        plain_abort = wait_for(lambda: engine_running(url) == 0, 5)
        assert plain_abort < 1.0

        # SIGTERM with two requests running: they finish, new ones get 503, exit 0.
        results: list[int] = []
        body = {**LONG, "max_tokens": 60}

        def run() -> None:
            results.append(
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code
            )

        workers = [threading.Thread(target=run) for _ in range(2)]
        for w in workers:
            w.start()
        wait_for(lambda: engine_running(url) == 2, 20)
        sent = time.perf_counter()
        os.kill(srv.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        for w in workers:
            w.join(120)
        assert results == [200, 200]
        assert srv.proc.wait(timeout=120) == 0
        drain = time.perf_counter() - sent
    record_result(
        "disconnect_and_drain",
        {
            "stream_abort_s": round(stream_abort, 3),
            "non_stream_abort_s": round(plain_abort, 3),
            "sigterm_to_exit_s": round(drain, 2),
        },
    )


def test_engine_death_turns_unhealthy_and_fails_fast(
    demo: DemoAssets, adapters_dir: Path, tmp_path: Path
) -> None:
    env = registry_env(demo, tmp_path)
    with running_server(
        demo.base_dir, adapters_dir, tmp_path / "s.log", env=env, dtype="bfloat16"
    ) as srv:
        url = srv.url
        assert httpx.get(f"{url}/health").status_code == 200
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        core = [
            p for p in children if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
        ]
        victims = core or children
        assert victims, "no engine process found"
        killed = time.perf_counter()
        for p in victims:
            p.kill()
        unhealthy = wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 503, 30)
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json={**LONG, "max_tokens": 5}, timeout=30)
        fail_fast = time.perf_counter() - start
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "engine_unavailable"
        assert fail_fast < 2.0
    record_result(
        "engine_death",
        {
            "kill_to_unhealthy_s": round(unhealthy, 2),
            "request_failed_in_s": round(fail_fast, 3),
            "since_kill_s": round(time.perf_counter() - killed, 2),
        },
    )
