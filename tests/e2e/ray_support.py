"""What the Ray end-to-end tests (test_ray*.py) share: the server they start, their
request bodies and load, and the check that no process outlives the test."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY, registry_env
from tests.e2e.server_proc import ServerProc, running_server

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
ANY = {"x-loraswap-routing": "any"}  # Ray's default routing: no adapter affinity


@contextmanager
def running_ray_server(
    demo: DemoAssets,
    state: Path,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    adapters: Path | None = None,
) -> Iterator[ServerProc]:
    """`loraswap serve --ray <args>` on the demo model (adapters from `adapters`, else the
    demo's), a private registry under `state` plus `env`. Each replica's engine is kept
    small (1 GiB of KV cache, 2 LoRA slots): two engines share this machine. Stopped with
    SIGTERM to the server alone: it takes Ray and the replicas down itself."""
    with running_server(
        demo.base_dir,
        adapters if adapters is not None else demo.adapters_dir,
        state / "server.log",
        dtype="bfloat16",
        env={**registry_env(demo, state), **(env or {})},
        extra_args=["--ray", *args, "--kv-cache-gib", "1", "--max-loras", "2"],
        stop_timeout_s=90,
        sigterm_group=False,
    ) as proc:
        yield proc


def copy_adapters(demo: DemoAssets, into: Path, names: Iterable[str]) -> None:
    """The demo adapters copied under `names`, in turn: distinct adapters to vLLM."""
    for i, name in enumerate(names):
        source = demo.adapter_names[i % len(demo.adapter_names)]
        shutil.copytree(demo.adapters_dir / source, into / name)


def chat(model: str, content: str = "hi", *, max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


async def post_chats(
    url: str, models: list[str], headers: dict[str, str] | None = None, concurrency: int = 4
) -> list[httpx.Response]:
    """A two-token chat to each of `models`, `concurrency` at a time; the responses in the
    order of `models`."""
    queue = list(enumerate(models))
    out: list[httpx.Response | None] = [None] * len(models)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:

        async def worker() -> None:
            while queue:
                i, model = queue.pop(0)
                body = chat(model, max_tokens=2)
                out[i] = await c.post("/v1/chat/completions", json=body, headers=headers)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in out if r is not None]


def assert_all_gone(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
