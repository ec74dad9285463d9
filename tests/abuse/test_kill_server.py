"""Fault injection with a real server process: SIGKILL while admin registrations (uploads
and paths, deletes and re-creates) stream in, then a restart on the same home. Every
registration the server acknowledged (201) is there and serves; every acknowledged
delete stays deleted; a re-created name continues its numbering; nothing is half there
(a recorded version whose files fail to verify would answer 409 or 5xx)."""

from __future__ import annotations

import http.server
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
from typing import Any

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


def _settings(tmp_path: Path, **extra: object) -> Path:
    make_base(tmp_path / "base")
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "served_model_name": "tiny",
                "model": str(tmp_path / "base"),
                "home": str(tmp_path / "home"),
                "admin_key": KEY,
                "allowed_roots": [str(tmp_path / "allowed")],
                **extra,
            }
        )
    )
    return settings


def _leftovers(storage: Path) -> list[Path]:
    """Staging folders (downloads and copies in progress) under the storage folder."""
    return [p for p in storage.rglob(".staging-*")]


def test_kill_9_during_a_download_then_restart(tmp_path: Path) -> None:
    """The server dies with half an http download staged: after the restart the staged
    half is gone, the unacknowledged name is not registered, the acknowledged one serves,
    and the same registration then works."""
    root = tmp_path / "www"
    make_adapter(root / "a0", seed=0)
    make_adapter(root / "a1", seed=1)
    stalled, release = threading.Event(), threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            if self.path == "/a1/adapter_model.safetensors" and not release.is_set():
                body = (root / "a1" / "adapter_model.safetensors").read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                stalled.set()  # half sent: the server is now mid-download
                release.wait(30)
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    www = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=www.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{www.server_address[1]}"
    settings = _settings(tmp_path, sources={"http_allowed_networks": ["127.0.0.1/32"]})
    storage = tmp_path / "home" / "registry"
    try:
        with server(settings) as (api, proc), httpx.Client(base_url=api, headers=AUTH) as c:
            r = c.post("/admin/adapters", json={"name": "dl0", "source": f"{url}/a0"})
            assert r.status_code == 201, r.text
            answer: list[object] = []

            def register() -> None:
                try:
                    answer.append(
                        c.post("/admin/adapters", json={"name": "dl1", "source": f"{url}/a1"})
                    )
                except httpx.TransportError as exc:
                    answer.append(exc)

            worker = threading.Thread(target=register)
            worker.start()
            assert stalled.wait(30), "the download never started"
            time.sleep(0.2)  # let the first half reach the staged file
            assert _leftovers(storage), "no staging folder: the kill would not be mid-download"
            proc.send_signal(signal.SIGKILL)
            worker.join(timeout=30)
            assert answer and isinstance(answer[0], httpx.TransportError), answer
        release.set()
        with server(settings) as (api, _), httpx.Client(base_url=api, headers=AUTH) as c:
            assert _leftovers(storage) == [], "the killed download's staging folder stayed"
            listed = {a["name"] for a in c.get("/admin/adapters").json()["data"]}
            assert listed == {"dl0"}
            body = {"model": "dl0", "messages": [{"role": "user", "content": "x"}]}
            assert c.post("/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
            r = c.post("/admin/adapters", json={"name": "dl1", "source": f"{url}/a1"})
            assert r.status_code == 201, r.text
            assert r.json()["versions"][-1]["version"] == 1
            body["model"] = "dl1"
            assert c.post("/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
    finally:
        release.set()
        www.shutdown()
        www.server_close()


def _swapper(url: str, sources: list[Path], log: list[tuple[str, int]]) -> None:
    """Swaps of adapter "sw" until the server dies: a new version made current (the hot
    swap), or a rollback to an older one. Logs ("ACK", current) once acknowledged and
    ("TRY", target) before each call, so the one in flight at the kill is known."""
    body = {"model": "sw", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
        latest = 1
        for i in range(10_000):
            try:
                if i % 2 == 0:
                    src = sources[i % len(sources)]
                    log.append(("TRY", latest + 1))
                    r = c.post("/admin/adapters/sw/versions", json={"source": str(src)})
                    assert r.status_code == 201, r.text
                    latest = r.json()["version"]
                    log.append(("ACK", latest))
                else:
                    target = 1 + i % latest
                    log.append(("TRY", target))
                    r = c.put("/admin/adapters/sw/current", json={"version": target})
                    assert r.status_code == 200, r.text
                    log.append(("ACK", r.json()["current_version"]))
                assert c.post("/v1/chat/completions", json=body).status_code == 200
            except (httpx.TransportError, AssertionError):
                return


def test_kill_9_during_swaps_then_restart(tmp_path: Path) -> None:
    """Kill -9 while versions are hot-swapped and rolled back under requests: after the
    restart the current version is the last acknowledged one or the one in flight,
    every acknowledged version is there with files that verify (each one serves), and
    no staging folder is left."""
    sources = [make_adapter(tmp_path / "allowed" / f"s{i}", seed=i) for i in range(3)]
    settings = _settings(tmp_path)
    rng = random.Random(14)
    log: list[tuple[str, int]] = []
    with server(settings) as (url, proc), httpx.Client(base_url=url, headers=AUTH) as c:
        r = c.post("/admin/adapters", json={"name": "sw", "source": str(sources[0])})
        assert r.status_code == 201, r.text
        worker = threading.Thread(target=_swapper, args=(url, sources, log))
        worker.start()
        time.sleep(0.5 + rng.random())
        proc.send_signal(signal.SIGKILL)
        worker.join(timeout=30)
        assert not worker.is_alive()
    acked = [v for what, v in log if what == "ACK"]
    assert len(acked) >= 3, log  # swaps were done before the kill
    in_flight = log[-1][1] if log[-1][0] == "TRY" else None
    with server(settings) as (url, _), httpx.Client(base_url=url, headers=AUTH) as c:
        assert _leftovers(tmp_path / "home" / "registry") == []
        sw = c.get("/admin/adapters/sw").json()
        assert sw["current_version"] in {acked[-1], in_flight}, (sw["current_version"], log[-3:])
        versions = [v["version"] for v in sw["versions"]]
        assert set(versions) >= {1, *acked}
        body = {"model": "sw", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for version in versions:  # every recorded version's files are there and verify
            r = c.put("/admin/adapters/sw/current", json={"version": version})
            assert r.status_code == 200, r.text
            assert c.post("/v1/chat/completions", json=body).status_code == 200, version
