"""Fault injection: the adapter storage (uploads + download cache) runs out of disk.

The storage folder is a real 4 MiB tmpfs (mounted here: we run as root in CI), adapters
are registered from a real http server on loopback until the filesystem is full. A full
disk is the server's problem, not the client's: 507 `insufficient_storage` (not a 400
"download failed" nor a 500), nothing half-registered (no record, no stray files), and
registrations work again once space comes back.
"""

from __future__ import annotations

import errno
import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.adapters import make_adapter, make_base
from tests.fakes import FakeEngine

KEY = "disk-admin-key"
AUTH = {"authorization": f"Bearer {KEY}"}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    for i in range(40):  # distinct weights: each download is a new cache entry
        make_adapter(root / f"a{i}", seed=i, rank=16)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}


def _fill(mount: Path, leave: int) -> Path:
    """A filler file taking all but about `leave` bytes of the filesystem."""
    filler = mount / "filler"
    free = shutil.disk_usage(mount).free - leave
    with filler.open("wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
        except OSError as exc:  # tmpfs rounding: full a little earlier than computed
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def test_download_cache_disk_full(tmp_path: Path, small_disk: Path, www: tuple[str, Path]) -> None:
    url, root = www
    make_base(tmp_path / "base")
    settings = Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        home=tmp_path / "home",
        admin_key=KEY,
        storage_dir=small_disk / "registry",
        sources={"http_allowed_networks": ["127.0.0.1/32"]},
    )
    size = (root / "a0" / "adapter_model.safetensors").stat().st_size
    with TestClient(create_app(settings, engine=FakeEngine())) as c:
        assert (
            c.post(
                "/admin/adapters", headers=AUTH, json={"name": "ok0", "source": f"{url}/a0"}
            ).status_code
            == 201
        )
        # Leave room for less than one more download: the next one hits ENOSPC.
        filler = _fill(small_disk, leave=size // 2)
        refused = None
        for i in range(1, 6):
            before = _files(small_disk)
            r = c.post(
                "/admin/adapters", headers=AUTH, json={"name": f"h{i}", "source": f"{url}/a{i}"}
            )
            if r.status_code != 201:
                refused = i, r
                break
        assert refused is not None, "the disk never filled up"
        i, r = refused
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage", r.text
        # Nothing half-registered: no record, and no new file left behind.
        listed = {a["name"] for a in c.get("/admin/adapters", headers=AUTH).json()["data"]}
        assert f"h{i}" not in listed
        assert _files(small_disk) == before
        # Uploads land on the same disk: the same answer, nothing left either.
        src = root / f"a{i + 10}"
        files = {
            "adapter_config": ("c", (src / "adapter_config.json").read_bytes()),
            "adapter_model": ("m", (src / "adapter_model.safetensors").read_bytes()),
        }
        r = c.post("/admin/adapters/upload", headers=AUTH, data={"name": "up"}, files=files)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage", r.text
        assert _files(small_disk) == before
        # The server is still up and serving what it had.
        body = {"model": "ok0", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", headers=AUTH, json=body).status_code == 200
        # Space comes back: the same registration now works, as version 1.
        os.unlink(filler)
        r = c.post("/admin/adapters", headers=AUTH, json={"name": f"h{i}", "source": f"{url}/a{i}"})
        assert r.status_code == 201, r.text
        assert r.json()["versions"][-1]["version"] == 1
        body["model"] = f"h{i}"
        assert c.post("/v1/chat/completions", headers=AUTH, json=body).status_code == 200
