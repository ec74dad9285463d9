"""`loraswap adapters push DIR NAME` end to end: the real CLI in its own process, over
real HTTP, into the real server and engine. A training run's output folder (the PEFT
`save_pretrained` files of the demo's `pirate` adapter, with what a Trainer leaves beside
them: its state, its optimizer pickle) is checked locally, uploaded without the rest, and
answers like the pirate; the run's next checkpoint (here, the `formal` weights) becomes
the next version at once and answers like it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from server.demo import DemoAssets
from tests.e2e.conftest import ADMIN_KEY, BASE
from tests.e2e.server_proc import ServerProc

NAME = "pushed-run"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def checkpoint(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in PEFT_FILES:
        shutil.copy(source / name, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    # What push must never upload: a pickle (torch.save of the optimizer state).
    (folder / "optimizer.pt").write_bytes(b"\x80\x04\x95\x00pickle, never uploaded")
    return folder


def push(server: ServerProc, folder: Path, base: Path) -> str:
    cmd = [sys.executable, "-m", "server", "adapters", "push", str(folder), NAME]
    cmd += ["--base", str(base), "--url", server.url]
    env = {**os.environ, "LORASWAP_ADMIN_KEY": ADMIN_KEY}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def reply(server: ServerProc) -> str:
    body = {
        "model": f"{BASE}:{NAME}",
        "messages": [{"role": "user", "content": "How is the weather today?"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_a_training_run_then_serve_it(
    server: ServerProc, demo: DemoAssets, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    first = checkpoint(demo.adapters_dir / "pirate", run / "checkpoint-500")
    out = push(server, first, demo.base_dir)
    assert f"pushed {NAME} v1" in out and "(current)" in out, out
    (curl,) = [line for line in out.splitlines() if line.startswith("curl ")]
    assert f'"model": "{BASE}:{NAME}"' in curl
    assert reply(server).startswith("Arr"), "the pushed pirate answers as the pirate"

    later = checkpoint(demo.adapters_dir / "formal", run / "checkpoint-1000")
    assert f"pushed {NAME} v2" in push(server, later, demo.base_dir)
    assert reply(server).startswith("Dear"), "the next checkpoint serves at once"

    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    info = httpx.get(f"{server.url}/admin/adapters/{NAME}", headers=admin, timeout=60).json()
    assert info["current_version"] == 2
    assert [v["sha256"] for v in info["versions"]] == [
        sha256(f / "adapter_model.safetensors") for f in (first, later)
    ]


def test_push_refuses_a_broken_run_before_uploading(
    server: ServerProc, demo: DemoAssets, tmp_path: Path
) -> None:
    broken = checkpoint(demo.adapters_dir / "pirate", tmp_path / "run" / "checkpoint-7")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cmd = [sys.executable, "-m", "server", "adapters", "push", str(broken), "never-pushed"]
    cmd += ["--url", server.url, "--admin-key", ADMIN_KEY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "adapter_model.safetensors" in done.stdout + done.stderr
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.get(f"{server.url}/admin/adapters/never-pushed", headers=admin, timeout=60)
    assert r.status_code == 404, r.text
