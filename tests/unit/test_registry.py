"""The registry: persistence, sources, validation before registration, clean failures."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters_registry import (
    AdapterNotFound,
    AdapterTooLarge,
    AlreadyExists,
    BaseModelShapes,
    ChecksumMismatch,
    IncompatibleAdapter,
    InUse,
    InvalidAdapterName,
    InvalidSource,
    Limits,
    MalformedAdapter,
    PathOutsideRoots,
    RankTooLarge,
    SourceChanged,
    UnsafeFormat,
)
from adapters_registry.records import Variant
from adapters_registry.registry import Registry, RegistryConfig
from adapters_registry.sources import Fetched, Source, SourcesConfig
from tests.adapters import make_adapter, make_base


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    return root


def open_registry(
    tmp_path: Path, roots: Path, database: str | Path, cache_bytes: int = 10**7
) -> Registry:
    base = BaseModelShapes.from_dir(make_base(tmp_path / "base"), "tiny")
    config = RegistryConfig(
        database=database,
        storage_dir=tmp_path / "home" / "storage",
        allowed_roots=(roots,),
        cache_max_bytes=cache_bytes,
        limits=Limits(max_rank=16, max_bytes=10**6),
        # These tests serve adapters over loopback HTTP, which sources refuse by default.
        sources=SourcesConfig(http_allowed_networks=("127.0.0.1/32",)),
    )
    return Registry(config, base)


@pytest.fixture
def registry(tmp_path: Path, roots: Path, database: str | Path) -> Iterator[Registry]:
    """A registry on each backend (conftest.py): every test using it runs on both."""
    reg = open_registry(tmp_path, roots, database)
    yield reg
    reg.close()


def sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def storage_files(tmp_path: Path) -> list[str]:
    """Every file the registry owns on disk, except its database."""
    root = tmp_path / "home" / "storage"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_register_versions_current_and_persistence(
    tmp_path: Path, roots: Path, database: str | Path
) -> None:
    reg = open_registry(tmp_path, roots, database)
    v1 = reg.register("pirate", str(make_adapter(roots / "p1", rank=8)))
    v2 = reg.register("pirate", str(make_adapter(roots / "p2", rank=16)), create=False)
    assert (v1.version, v2.version) == (1, 2)
    assert reg.adapter("pirate").current_version == 2  # type: ignore[union-attr]
    reg.set_current("pirate", 1)  # rollback
    reg.put_alias("bot", (Variant("pirate", 2, 90), Variant("pirate", None, 10)))
    reg.set_pinned("pirate", True)
    reg.close()

    again = open_registry(tmp_path, roots, database)
    record = again.adapter("pirate")
    assert record is not None
    assert (record.current_version, record.pinned) == (1, True)
    assert [(v.version, v.rank, v.sha256) for v in record.versions] == [
        (1, 8, v1.sha256),
        (2, 16, v2.sha256),
    ]
    assert record.versions[0].target_modules == ("q_proj", "v_proj")
    assert again.alias("bot").variants[0] == Variant("pirate", 2, 90)  # type: ignore[union-attr]
    again.close()


def test_version_numbers_never_reused(registry: Registry, roots: Path) -> None:
    registry.register("a", str(make_adapter(roots / "x", rank=8)))
    registry.register("a", str(make_adapter(roots / "y", rank=16)), create=False)
    registry.set_current("a", 1)
    registry.delete_version("a", 2)
    v = registry.register("a", str(roots / "y"), create=False)
    assert v.version == 3


def test_conflicts(registry: Registry, roots: Path) -> None:
    path = str(make_adapter(roots / "x"))
    registry.register("a", path)
    with pytest.raises(AlreadyExists):
        registry.register("a", path)
    registry.register("b", path)
    registry.put_alias("ab", (Variant("a", 1, 1), Variant("b", None, 1)))
    with pytest.raises(AlreadyExists):
        registry.register("ab", path)  # alias names and adapter names share one space
    with pytest.raises(InUse, match="current version"):
        registry.delete_version("a", 1)
    with pytest.raises(InUse, match="alias 'ab'"):
        registry.delete_adapter("b")
    registry.delete_alias("ab")
    registry.delete_adapter("b")
    assert registry.adapter("b") is None


def test_alias_must_point_at_existing_versions(registry: Registry, roots: Path) -> None:
    registry.register("a", str(make_adapter(roots / "x")))
    with pytest.raises(AdapterNotFound, match="no version 7"):
        registry.put_alias("ab", (Variant("a", 7, 1),))
    with pytest.raises(AdapterNotFound):
        registry.put_alias("ab", (Variant("ghost", None, 1),))


# -- path sources and validation failures: nothing registered --------------------------


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda roots, tmp: str(roots / ".." / "outside"), PathOutsideRoots),
        (lambda roots, tmp: str(make_adapter(tmp / "outside")), PathOutsideRoots),
        (lambda roots, tmp: _symlinked_out(roots, tmp), PathOutsideRoots),
        (lambda roots, tmp: _pickled(roots), UnsafeFormat),
        (lambda roots, tmp: _truncated(roots), MalformedAdapter),
        (lambda roots, tmp: str(make_adapter(roots / "r", rank=32)), RankTooLarge),
        (lambda roots, tmp: str(make_adapter(roots / "o", hidden_scale=2)), IncompatibleAdapter),
        (lambda roots, tmp: str(roots / "missing"), InvalidSource),
    ],
    ids=["dotdot", "outside", "symlink", "pickle", "truncated", "rank", "other-base", "missing"],
)
def test_refused_sources_leave_nothing(
    registry: Registry,
    roots: Path,
    tmp_path: Path,
    make: Callable[[Path, Path], str],
    error: type[Exception],
) -> None:
    make_adapter(tmp_path / "outside")
    with pytest.raises(error):
        registry.register("bad", make(roots, tmp_path))
    assert registry.adapter("bad") is None
    assert registry.adapters() == []


def _symlinked_out(roots: Path, tmp: Path) -> str:
    os.symlink(make_adapter(tmp / "elsewhere"), roots / "link")
    return str(roots / "link")


def _pickled(roots: Path) -> str:
    path = make_adapter(roots / "pk")
    (path / "adapter_model.bin").write_bytes(b"\x80\x04")
    return str(path)


def _truncated(roots: Path) -> str:
    path = make_adapter(roots / "tr")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    return str(path)


def test_invalid_name(registry: Registry, roots: Path) -> None:
    with pytest.raises(InvalidAdapterName):
        registry.register("../etc", str(make_adapter(roots / "x")))


def test_checksum_checked_when_given(registry: Registry, roots: Path) -> None:
    path = make_adapter(roots / "x")
    with pytest.raises(ChecksumMismatch):
        registry.register("a", str(path), sha256="ab" * 32)
    assert registry.register("a", str(path), sha256=sha(path)).sha256 == sha(path)


def test_changed_local_files_are_not_served_as_the_old_version(
    tmp_path: Path, roots: Path, database: str | Path
) -> None:
    """A local folder is copied at registration: a later change there does not reach the
    registered version, and a damaged copy is refused (checked on first use)."""
    registry = open_registry(tmp_path, roots, database)
    path = make_adapter(roots / "x", rank=8)
    v = registry.register("a", str(path))
    make_adapter(path, rank=16)
    stored = registry.local_files(v)
    assert sha(stored) == v.sha256 and not stored.is_relative_to(roots)
    registry.close()
    (stored / "adapter_model.safetensors").write_bytes(b"torn")
    registry = open_registry(tmp_path, roots, database)
    try:
        with pytest.raises(SourceChanged, match="a@1"):
            registry.local_files(v)
    finally:
        registry.close()


# -- uploads ---------------------------------------------------------------------------


def upload_files(path: Path) -> dict[str, io.BytesIO]:
    return {
        n: io.BytesIO((path / n).read_bytes())
        for n in ("adapter_config.json", "adapter_model.safetensors")
    }


def test_upload(registry: Registry, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "src")
    v = registry.register_upload("up", upload_files(src))  # type: ignore[arg-type]
    assert v.source == "upload"
    assert (registry.local_files(v) / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()
    registry.delete_adapter("up")
    assert storage_files(tmp_path) == []


def test_failed_upload_leaves_no_files(registry: Registry, tmp_path: Path) -> None:
    bad = make_adapter(tmp_path / "src", rank=32)
    with pytest.raises(RankTooLarge):
        registry.register_upload("up", upload_files(bad))  # type: ignore[arg-type]
    good = make_adapter(tmp_path / "good")
    with pytest.raises(ChecksumMismatch):
        registry.register_upload("up", upload_files(good), sha256="0" * 64)  # type: ignore[arg-type]
    files = upload_files(good)
    del files["adapter_config.json"]
    with pytest.raises(MalformedAdapter, match="exactly"):
        registry.register_upload("up", files)  # type: ignore[arg-type]
    assert registry.adapters() == []
    assert storage_files(tmp_path) == []


# -- http(s) downloads -----------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_download_verified_and_cached(registry: Registry, http_root: tuple[str, Path]) -> None:
    url, www = http_root
    src = make_adapter(www / "pirate")
    v = registry.register("pirate", f"{url}/pirate", sha256=sha(src))
    assert v.source == f"{url}/pirate"
    cached = registry.local_files(v)
    assert cached.parent == registry.cache.root
    # Evicted from the cache: fetched again, and checked again, on the next load.
    registry.cache.remove(v.content_digest)
    assert (registry.local_files(v) / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("path", "sha256", "error"),
    [
        ("missing", None, InvalidSource),
        ("pirate", "0" * 64, ChecksumMismatch),
        ("big", None, AdapterTooLarge),
        ("wrongbase", None, IncompatibleAdapter),
    ],
)
def test_failed_download_leaves_nothing(
    registry: Registry,
    http_root: tuple[str, Path],
    tmp_path: Path,
    path: str,
    sha256: str | None,
    error: type[Exception],
) -> None:
    url, www = http_root
    make_adapter(www / "pirate")
    make_adapter(www / "wrongbase", hidden_scale=2)
    big = make_adapter(www / "big")
    (big / "adapter_model.safetensors").write_bytes(b"\0" * (10**6 + 1))
    with pytest.raises(error):
        registry.register("x", f"{url}/{path}", sha256=sha256)
    assert registry.adapters() == []
    assert storage_files(tmp_path) == []


def test_bad_urls(registry: Registry) -> None:
    with pytest.raises(InvalidSource):
        registry.register("x", "http://127.0.0.1:9/nothing-listens-here")
    with pytest.raises(InvalidSource, match="unsupported source scheme"):
        registry.register("x", "ftp://host/key")


def test_download_cache_is_capped_lru(
    tmp_path: Path, roots: Path, http_root: tuple[str, Path], database: str | Path
) -> None:
    url, www = http_root
    one = make_adapter(www / "a0")
    size = sum(p.stat().st_size for p in one.iterdir())
    reg = open_registry(tmp_path, roots, database, cache_bytes=int(size * 2.5))
    for i in range(4):
        make_adapter(www / f"a{i}", seed=i)  # same size, different weights
        reg.register(f"a{i}", f"{url}/a{i}")
        assert reg.cache.usage() <= reg.cache.max_bytes
    cached = {p.name for p in reg.cache.root.iterdir() if not p.name.startswith(".")}
    assert len(cached) == 2  # the two most recent
    assert reg.adapter("a3").current.content_digest in cached  # type: ignore[union-attr]
    reg.close()


def test_replicas_follow_each_others_changes(
    tmp_path: Path, roots: Path, database: str | Path
) -> None:
    one = open_registry(tmp_path, roots, database)
    two = open_registry(tmp_path, roots, database)
    assert not two.refresh()  # nothing changed: no reload
    one.register("pirate", str(make_adapter(roots / "p1")))
    one.put_tenant("t", max_concurrent=1, tokens_per_minute=None)
    assert two.adapter("pirate") is None  # requests read the snapshot...
    assert two.refresh()  # ...until the replica looks for changes
    assert two.adapter("pirate").current_version == 1  # type: ignore[union-attr]
    assert two.tenant("t") is not None
    assert not two.refresh()
    two.register("pirate", str(make_adapter(roots / "p2", seed=2)), create=False)
    assert one.refresh() and one.adapter("pirate").current_version == 2  # type: ignore[union-attr]
    one.close()
    two.close()


def _bytes_under(root: Path) -> int:
    """Every byte under `root`, whatever it is (cached files, staged downloads, marks)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_download_cache_folder_never_exceeds_its_cap(
    tmp_path: Path,
    roots: Path,
    http_root: tuple[str, Path],
    database: str | Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """loadtests memory.md: downloads were staged inside the cache folder before room was
    made, so it held cap + one adapter. They are staged in a sibling folder (same
    filesystem, so moving in is a rename) and room is made before they move in."""
    url, www = http_root
    one = make_adapter(www / "a0")
    size = sum(p.stat().st_size for p in one.iterdir())
    reg = open_registry(tmp_path, roots, database, cache_bytes=2 * size)  # exactly 2
    real_fetch = reg.sources.fetch
    seen: list[int] = []

    def fetch(source: Source, dest: Path, **kwargs: int) -> Fetched:
        fetched = real_fetch(source, dest, **kwargs)
        assert dest.parent == reg.config.storage_dir / "staging"
        seen.append(_bytes_under(reg.cache.root))
        return fetched

    monkeypatch.setattr(reg.sources, "fetch", fetch)
    try:
        for i in range(4):
            make_adapter(www / f"a{i}", seed=i)  # same size, different weights
            v = reg.register(f"a{i}", f"{url}/a{i}")
            seen.append(_bytes_under(reg.cache.root))
        # An evicted version comes back (downloaded again, sha256 checked) within the cap.
        first = reg.adapter("a0").current  # type: ignore[union-attr]
        assert first is not None and reg.cache.get(first.content_digest) is None
        assert reg.local_files(first).parent == reg.cache.root
        seen.append(_bytes_under(reg.cache.root))
        assert v.content_digest in {p.name for p in reg.cache.root.iterdir()}
        assert len(seen) == 10 and max(seen) <= reg.cache.max_bytes, seen
        assert list((reg.config.storage_dir / "staging").iterdir()) == []
    finally:
        reg.close()


def test_adapter_larger_than_the_cache_is_413(
    tmp_path: Path, roots: Path, http_root: tuple[str, Path], database: str | Path
) -> None:
    url, www = http_root
    one = make_adapter(www / "a0")
    size = sum(p.stat().st_size for p in one.iterdir())
    reg = open_registry(tmp_path, roots, database, cache_bytes=size // 2)
    try:
        with pytest.raises(AdapterTooLarge):
            reg.register("a0", f"{url}/a0")
        assert storage_files(tmp_path) == []
    finally:
        reg.close()
