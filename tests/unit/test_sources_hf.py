"""hf://org/repo[@revision]: off by default; when enabled, the revision is pinned to its
commit at registration. The hub is unreachable here, so its client is replaced by a
stand-in serving a local folder (the registry's side is what is tested)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapters_registry import BaseModelShapes, InvalidSource, Limits
from adapters_registry.registry import Registry, RegistryConfig
from adapters_registry.sources import SourcesConfig
from tests.adapters import make_adapter, make_base

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def open_registry(tmp_path: Path, **sources: Any) -> Registry:
    base = BaseModelShapes.from_dir(make_base(tmp_path / "base"), "tiny")
    config = RegistryConfig(
        database=tmp_path / "registry.db",
        storage_dir=tmp_path / "storage",
        allowed_roots=(),
        cache_max_bytes=10**7,
        limits=Limits(max_rank=16, max_bytes=10**6),
        sources=SourcesConfig(**sources),
    )
    return Registry(config, base)


def test_hub_sources_are_off_by_default(tmp_path: Path) -> None:
    reg = open_registry(tmp_path)
    try:
        with pytest.raises(InvalidSource, match="hf_enabled"):
            reg.register("a", "hf://org/repo")
    finally:
        reg.close()


def test_revision_is_pinned_to_its_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    repo = make_adapter(tmp_path / "repo")
    asked: list[tuple[str, str | None]] = []

    class Api:
        def __init__(self, endpoint: str | None = None) -> None:
            pass

        def model_info(self, repo_id: str, revision: str | None = None, **_: Any) -> Any:
            asked.append((repo_id, revision))
            files = [
                SimpleNamespace(rfilename=p.name, size=p.stat().st_size) for p in repo.iterdir()
            ]
            return SimpleNamespace(sha=COMMIT, siblings=files)

    def download(repo_id: str, filename: str, *, revision: str, local_dir: str, **_: Any) -> str:
        assert revision == COMMIT  # files come from the pinned commit, not the branch
        return str(shutil.copy(repo / filename, Path(local_dir) / filename))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    reg = open_registry(tmp_path, hf_enabled=True)
    try:
        v = reg.register("a", "hf://org/adapter@main")
        assert v.source == f"hf://org/adapter@{COMMIT}"
        reg.cache.remove(v.content_digest)
        reg.local_files(v)  # fetched again: from the commit
        assert asked == [("org/adapter", "main"), ("org/adapter", COMMIT)]
        with pytest.raises(InvalidSource, match="hf://org/repo"):
            reg.register("b", "hf://not a repo")
    finally:
        reg.close()
