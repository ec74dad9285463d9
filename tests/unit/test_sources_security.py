"""Security review 2026-12-06, the source side (M1, M2, M3, M4, M7, L4): each test here
failed on the code before the fix (see the branch's report)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_registry import (
    AdapterError,
    BaseModelShapes,
    InvalidSource,
    PathOutsideRoots,
    SourceChanged,
)
from adapters_registry.registry import Registry, RegistryConfig
from adapters_registry.validate import Limits
from tests.adapters import make_adapter, make_base

LOOPBACK_ONLY = ("127.0.0.1/32",)


def open_registry(
    tmp_path: Path, *, allow: tuple[str, ...] = (), deadline_s: float | None = None
) -> Registry:
    base = BaseModelShapes.from_dir(make_base(tmp_path / "base"), "tiny")
    extra: dict[str, Any] = {}
    try:
        from adapters_registry.sources import SourcesConfig
    except ImportError:  # the code before the Source interface
        pass
    else:
        options: dict[str, Any] = {"http_allowed_networks": allow}
        if deadline_s is not None:
            options["download_timeout_s"] = deadline_s
        extra["sources"] = SourcesConfig(**options)
    (tmp_path / "allowed").mkdir(exist_ok=True)
    config = RegistryConfig(
        database=tmp_path / "registry.db",
        storage_dir=tmp_path / "storage",
        allowed_roots=(tmp_path / "allowed",),
        cache_max_bytes=10**7,
        limits=Limits(max_rank=16, max_bytes=10**6),
        **extra,
    )
    return Registry(config, base)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = open_registry(tmp_path, allow=LOOPBACK_ONLY)
    yield reg
    reg.close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(handler: Callable[..., Any], host: str = "127.0.0.1") -> Iterator[str]:
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{host}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    make_adapter(root / "a")
    for url in _serve(functools.partial(_Quiet, directory=str(root))):
        yield url, root


def _weights(path: Path) -> bytes:
    return (path / "adapter_model.safetensors").read_bytes()


def _sha(path: Path) -> str:
    return hashlib.sha256(_weights(path)).hexdigest()


# -- M1: the HTTP policy ---------------------------------------------------------------


def test_loopback_is_refused_unless_allowed(tmp_path: Path, www: tuple[str, Path]) -> None:
    url, _ = www
    reg = open_registry(tmp_path)  # no networks allowed: the default
    try:
        with pytest.raises(InvalidSource, match="not allowed"):
            reg.register("a", f"{url}/a")
        assert reg.adapters() == []
    finally:
        reg.close()


def test_redirects_are_checked_against_the_policy(tmp_path: Path, www: tuple[str, Path]) -> None:
    """127.0.0.1 is allowed, and redirects to 127.0.0.2 (also loopback, not allowed)."""
    url, _ = www
    target = url.replace("127.0.0.1", "127.0.0.2")

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target + self.path)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    # The adapter server listens on 127.0.0.1 only; serve it on 127.0.0.2 too.
    for other in _serve(functools.partial(_Quiet, directory=str(tmp_path / "www")), "127.0.0.2"):
        target = other
        for redirector in _serve(Redirect):
            reg = open_registry(tmp_path, allow=LOOPBACK_ONLY)
            try:
                with pytest.raises(InvalidSource, match="not allowed"):
                    reg.register("a", f"{redirector}/a")
            finally:
                reg.close()


def test_a_slow_server_hits_the_total_deadline(tmp_path: Path) -> None:
    """One byte every 0.1 s: each read is quick, the whole is not (the old per-read
    timeout never fired)."""

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "200")
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"{")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

        def log_message(self, format: str, *args: object) -> None:
            pass

    for url in _serve(Drip):
        reg = open_registry(tmp_path, allow=LOOPBACK_ONLY, deadline_s=1.0)
        try:
            start = time.monotonic()
            with pytest.raises(InvalidSource, match="deadline"):
                reg.register("a", f"{url}/a")
            assert time.monotonic() - start < 5
            assert _files_under(tmp_path / "storage") == []
        finally:
            reg.close()


# -- M2: every malformed response is a 4xx, not a 500 ----------------------------------


def _raw_server(reply: bytes) -> Iterator[str]:
    class Raw(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(reply)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Raw)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc",
    ],
    ids=["bad-status-line", "truncated-chunked", "truncated-length"],
)
def test_broken_responses_are_invalid_source(registry: Registry, reply: bytes) -> None:
    for url in _raw_server(reply):
        with pytest.raises(InvalidSource):
            registry.register("a", f"{url}/a")


@pytest.mark.parametrize(
    "url", ["http://h:abc/", "http://exa mple.com/a", "http://[::1/a", "http://h:99999/"]
)
def test_malformed_urls_are_invalid_source(registry: Registry, url: str) -> None:
    with pytest.raises(InvalidSource):
        registry.register("a", url)


def test_concurrent_uploads_of_the_same_weights(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both pass the 'not stored yet' check, then both move their copy in: the second
    move met a non-empty folder (ENOTEMPTY) and failed."""
    src = make_adapter(tmp_path / "src")
    real_rename = os.rename

    def slow_rename(a: Any, b: Any) -> None:
        time.sleep(0.3)
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", slow_rename)
    errors: list[BaseException] = []

    def upload(name: str) -> None:
        files = {
            n: io.BytesIO((src / n).read_bytes())
            for n in ("adapter_config.json", "adapter_model.safetensors")
        }
        try:
            registry.register_upload(name, files)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(f"u{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {a.name for a in registry.adapters()} == {"u0", "u1"}


def test_cache_entry_evicted_while_being_touched(
    registry: Registry, www: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = www
    v = registry.register("a", f"{url}/a")
    cache = registry.cache
    real_utime = os.utime

    def evicted_meanwhile(path: Any, *args: Any, **kwargs: Any) -> None:
        cache.remove(v.sha256)
        real_utime(path, *args, **kwargs)

    monkeypatch.setattr(os, "utime", evicted_meanwhile)
    assert cache.get(v.sha256) is None  # gone: a miss, not a FileNotFoundError
    monkeypatch.setattr(cache, "_entries", lambda: [cache.root / "gone"])
    monkeypatch.setattr(cache, "in_use", lambda: {"gone"})
    assert cache.fits(1)


# -- M3: the sha256 field is never a path ----------------------------------------------


@pytest.mark.parametrize("bad", ["../../outside", "/etc", "ab" * 31 + "/x", "z" * 64])
def test_sha256_must_be_64_hex_digits(
    registry: Registry, www: tuple[str, Path], tmp_path: Path, bad: str
) -> None:
    url, _ = www
    make_adapter(tmp_path / "outside")  # a valid adapter the old code would pick up
    with pytest.raises(AdapterError, match="64 hex"):
        registry.register("a", f"{url}/a", sha256=bad)
    assert registry.adapters() == []


# -- M4: what was validated is what is served ------------------------------------------


def test_local_sources_are_copied_at_registration(registry: Registry, tmp_path: Path) -> None:
    path = make_adapter(tmp_path / "allowed" / "x", rank=8)
    weights = _weights(path)
    v = registry.register("a", str(path))
    make_adapter(path, rank=16, seed=3)  # the owner changes the folder afterwards
    served = registry.local_files(v)
    assert _weights(served) == weights
    assert not served.is_relative_to(path.resolve())


def test_symlinked_weights_are_refused(registry: Registry, tmp_path: Path) -> None:
    outside = make_adapter(tmp_path / "secret")
    folder = make_adapter(tmp_path / "allowed" / "x")
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    with pytest.raises((PathOutsideRoots, InvalidSource)):
        registry.register("a", str(folder))
    assert registry.adapters() == []


def test_written_files_are_fsynced(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    src = make_adapter(tmp_path / "src")
    files = {
        n: io.BytesIO((src / n).read_bytes())
        for n in ("adapter_config.json", "adapter_model.safetensors")
    }
    registry.register_upload("u", files)  # type: ignore[arg-type]
    assert len(synced) >= 3  # both files and the folder they were renamed into


def test_cache_entries_are_verified_on_first_use_after_start(
    tmp_path: Path, www: tuple[str, Path]
) -> None:
    url, root = www
    reg = open_registry(tmp_path, allow=LOOPBACK_ONLY)
    v = reg.register("a", f"{url}/a")
    cached = reg.local_files(v) / "adapter_model.safetensors"
    reg.close()
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF  # a torn write, a bit flip: the same size, other bytes
    cached.write_bytes(bytes(data))
    reg = open_registry(tmp_path, allow=LOOPBACK_ONLY)
    try:
        assert _weights(reg.local_files(v)) == _weights(root / "a")  # fetched again
    finally:
        reg.close()


# -- M7: tenants see no server paths or source URLs ------------------------------------


def test_errors_on_the_serving_path_name_no_paths_or_urls(
    registry: Registry, tmp_path: Path, www: tuple[str, Path]
) -> None:
    url, root = www
    v = registry.register("a", f"{url}/a")
    registry.cache.remove(v.content_digest)
    make_adapter(root / "a", seed=9)  # changed at the source
    with pytest.raises(SourceChanged) as caught:
        registry.local_files(v)
    assert "127.0.0.1" not in caught.value.message
    (root / "a" / "adapter_model.safetensors").unlink()  # gone at the source
    with pytest.raises(AdapterError) as caught2:
        registry.local_files(v)
    assert "127.0.0.1" not in caught2.value.message and "/a" not in caught2.value.message


# -- L4: crash leftovers are swept at start --------------------------------------------


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_crash_leftovers_are_swept_at_start(tmp_path: Path) -> None:
    reg = open_registry(tmp_path)
    kept = make_adapter(tmp_path / "src")
    files = {
        n: io.BytesIO((kept / n).read_bytes())
        for n in ("adapter_config.json", "adapter_model.safetensors")
    }
    v = reg.register_upload("kept", files)  # type: ignore[arg-type]
    reg.close()
    storage = tmp_path / "storage"
    before = _files_under(storage)
    old = time.time() - 3600
    leftovers = [
        storage / "uploads" / ".staging-0123",
        storage / "staging" / ".staging-4567",
        storage / "uploads" / ("e" * 64),  # moved in, never recorded (killed in between)
    ]
    for path in leftovers:
        make_adapter(path)
        for p in [path, *path.iterdir()]:
            os.utime(p, (old, old))
    reg = open_registry(tmp_path)
    try:
        assert _files_under(storage) == before
        assert _weights(reg.local_files(v)) == _weights(kept)
    finally:
        reg.close()


def test_sha256_field_over_http_is_422(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings
    from tests.fakes import FakeEngine

    make_base(tmp_path / "base")
    (tmp_path / "allowed").mkdir()
    folder = make_adapter(tmp_path / "allowed" / "a")
    settings = Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        home=tmp_path / "home",
        admin_key="k",
        allowed_roots=[tmp_path / "allowed"],
    )
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        body = {"name": "a", "source": str(folder), "sha256": "../../etc"}
        r = client.post("/admin/adapters", headers={"authorization": "Bearer k"}, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_sha256"
        assert r.json()["error"]["param"] == "sha256"


def test_downloads_run_in_their_own_bounded_pool(
    registry: Registry, www: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """M1: not in the server's default executor (shared with everything else)."""
    from adapters_registry.sources.http import HttpSource

    url, _ = www
    threads: list[str] = []
    real_fetch = HttpSource.fetch

    def fetch(self: HttpSource, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_fetch(self, *args, **kwargs)

    monkeypatch.setattr(HttpSource, "fetch", fetch)
    registry.register("a", f"{url}/a")
    assert len(threads) == 1 and threads[0].startswith("adapter-download")
    assert registry.sources.config.download_workers == 4  # the pool's bound (a setting)


def test_same_weights_with_another_config_is_stored_apart(
    registry: Registry, tmp_path: Path
) -> None:
    """M4: the store was keyed by the weights' sha256 alone, so a second upload of the
    same weights with another adapter_config.json was served the first one's config."""
    import json

    src = make_adapter(tmp_path / "src")
    files = {
        n: io.BytesIO((src / n).read_bytes())
        for n in ("adapter_config.json", "adapter_model.safetensors")
    }
    one = registry.register_upload("one", files)  # type: ignore[arg-type]
    config = json.loads((src / "adapter_config.json").read_text())
    config["lora_alpha"] = 3 * config["r"]
    (src / "adapter_config.json").write_text(json.dumps(config))
    files = {
        n: io.BytesIO((src / n).read_bytes())
        for n in ("adapter_config.json", "adapter_model.safetensors")
    }
    two = registry.register_upload("two", files)  # type: ignore[arg-type]
    assert one.sha256 == two.sha256
    served = json.loads((registry.local_files(two) / "adapter_config.json").read_text())
    assert served["lora_alpha"] == 3 * config["r"]
    registry.delete_adapter("two")  # the other entry stays
    assert (registry.local_files(one) / "adapter_model.safetensors").is_file()
