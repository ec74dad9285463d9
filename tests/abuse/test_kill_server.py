"""Fault injection with a real server process: SIGKILL while admin registrations (uploads
and paths, deletes and re-creates) stream in, then a restart on the same home. Every
registration the server acknowledged (201) is there and serves; every acknowledged
delete stays deleted; a re-created name continues its numbering; nothing is half there
(a recorded version whose files fail to verify would answer 409 or 5xx)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.adapters import make_adapter, make_base
from tests.e2e.server_proc import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = "kill-admin-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@contextmanager
def server(settings: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.abuse.fake_server", str(settings), str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"server did not start: {err[-2000:]}")
            time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()


def _writer(url: str, sources: list[Path], start: int, log: list[tuple[str, str, int]]) -> None:
    """Registrations until the server dies; appends (what, name, version) once acked."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
        for i in range(start, start + 10_000):
            name, src = f"k{i}", sources[i % len(sources)]
            try:
                if i % 2:
                    files = {
                        "adapter_config": ("c", (src / "adapter_config.json").read_bytes()),
                        "adapter_model": ("m", (src / "adapter_model.safetensors").read_bytes()),
                    }
                    r = c.post("/admin/adapters/upload", data={"name": name}, files=files)
                else:
                    r = c.post("/admin/adapters", json={"name": name, "source": str(src)})
                assert r.status_code == 201, r.text
                log.append(("ACK", name, r.json()["versions"][-1]["version"]))
                if i % 3 == 0:
                    assert c.delete(f"/admin/adapters/{name}").status_code == 200
                    log.append(("DEL", name, 0))
                    other = sources[(i + 1) % len(sources)]
                    r = c.post("/admin/adapters", json={"name": name, "source": str(other)})
                    assert r.status_code == 201, r.text
                    log.append(("ACK", name, r.json()["versions"][-1]["version"]))
            except (httpx.TransportError, AssertionError):
                # The kill: this name's last call may or may not have been committed.
                log.append(("UNKNOWN", name, 0))
                return


def test_kill_9_during_registrations_then_restart(tmp_path: Path) -> None:
    make_base(tmp_path / "base")
    sources = [make_adapter(tmp_path / "allowed" / f"s{i}", seed=i) for i in range(4)]
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "served_model_name": "tiny",
                "model": str(tmp_path / "base"),
                "home": str(tmp_path / "home"),
                "admin_key": KEY,
                "allowed_roots": [str(tmp_path / "allowed")],
            }
        )
    )
    rng = random.Random(9)
    log: list[tuple[str, str, int]] = []
    for round_ in range(3):
        with server(settings) as (url, proc):
            worker = threading.Thread(target=_writer, args=(url, sources, 1000 * round_, log))
            worker.start()
            time.sleep(0.3 + rng.random())
            proc.send_signal(signal.SIGKILL)
            worker.join(timeout=30)
            assert not worker.is_alive()
        with server(settings) as (url, _):
            present: dict[str, int] = {}
            unknown = {name for what, name, _ in log if what == "UNKNOWN"}
            for what, name, version in log:
                if what == "ACK":
                    present[name] = version
                elif what == "DEL":
                    present.pop(name, None)
            for name in unknown:
                present.pop(name, None)
            with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
                listed = {a["name"]: a for a in c.get("/admin/adapters").json()["data"]}
                for name, version in present.items():
                    assert name in listed, f"{name} was acknowledged, then lost"
                    assert listed[name]["current_version"] == version
                deleted = {n for what, n, _ in log if what == "DEL"} - set(present) - unknown
                assert not deleted & set(listed)
                for name in listed:  # nothing half there: every recorded one serves
                    body = {"model": name, "messages": [{"role": "user", "content": "x"}]}
                    r = c.post("/v1/chat/completions", json={**body, "max_tokens": 2})
                    assert r.status_code == 200, (name, r.text)
    acks = [v for what, _, v in log if what == "ACK"]
    assert len(acks) >= 10 and 2 in acks  # work was done, and names were re-created
