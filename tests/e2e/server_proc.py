"""Run the real server (`python -m server serve`) as a subprocess and wait for /health."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 420


@dataclass
class ServerProc:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    start_seconds: float

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    model: Path | None,
    adapters_dir: Path | None,
    log: Path,
    *,
    dtype: str = "float32",
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    stop_timeout_s: float = 30,
    sigterm_group: bool = True,
) -> Iterator[ServerProc]:
    """`loraswap serve` on a free port; model/adapters None leave them to `extra_args`.

    Stopped with SIGTERM to its process group (to the server alone if not
    `sigterm_group`: it stops its children itself), SIGKILL to the group after
    `stop_timeout_s`."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        "1024",
        *extra_args,
    ]
    if model is not None:
        cmd += ["--model", str(model)]
    if adapters_dir is not None:
        cmd += ["--adapters-dir", str(adapters_dir)]
    full_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    server = ServerProc(f"http://127.0.0.1:{port}", proc, log, 0.0)
    try:
        _wait_healthy(server)
        server.start_seconds = time.perf_counter() - start
        yield server
    finally:
        _stop(proc, stop_timeout_s, sigterm_group)


def _wait_healthy(server: ServerProc) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not healthy after {START_TIMEOUT_S}s:\n{server.log_tail()}")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 30, group: bool = True) -> None:
    if proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
