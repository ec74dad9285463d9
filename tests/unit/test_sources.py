"""The Source interface: one kind per source string, each parsing its own, and the pins
each records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_registry import InvalidSource, PathOutsideRoots
from adapters_registry.sources import Fetched, LocalSource, Sources, SourcesConfig, is_url
from adapters_registry.sources.hf import HfSource
from adapters_registry.sources.http import HttpSource
from adapters_registry.sources.s3 import S3Source

W, C = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def sources(tmp_path: Path) -> Iterator[Sources]:
    (tmp_path / "roots" / "a").mkdir(parents=True)
    s = Sources(SourcesConfig(hf_enabled=True), (tmp_path / "roots",))
    yield s
    s.close()


def test_each_kind_parses_its_own_strings(sources: Sources, tmp_path: Path) -> None:
    assert isinstance(sources.parse(str(tmp_path / "roots" / "a")), LocalSource)
    assert isinstance(sources.parse("https://example.com/a"), HttpSource)
    assert isinstance(sources.parse("HTTP://example.com/a"), HttpSource)
    assert isinstance(sources.parse("s3://bucket/runs/a"), S3Source)
    assert isinstance(sources.parse("hf://org/repo@v1"), HfSource)
    with pytest.raises(InvalidSource, match="unsupported source scheme 'ftp'"):
        sources.parse("ftp://host/a")
    with pytest.raises(PathOutsideRoots):
        sources.parse(str(tmp_path / "elsewhere"))
    with pytest.raises(InvalidSource, match="credentials"):
        sources.parse("https://user:pw@example.com/a")
    with pytest.raises(InvalidSource):
        sources.parse("s3://bucket/a?x=1")
    assert [is_url(s) for s in ("s3://b/p", "hf://o/r", "https://h/", "/srv/a", "upload")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_s3_pins_round_trip(sources: Sources) -> None:
    source = sources.parse("s3://bucket/runs/a/")
    assert isinstance(source, S3Source) and source.key(W) == f"runs/a/{W}"
    versioned = source.pinned(Fetched(sha256="0" * 64, versions={W: "v2", C: "v1"}))
    again = sources.parse(versioned)
    assert isinstance(again, S3Source)
    assert again._versions == {W: "v2", C: "v1"}
    # Without versioning the store says "null": the ETags pin the objects instead.
    by_etag = source.pinned(
        Fetched(sha256="0" * 64, etags={W: '"e2"', C: '"e1"'}, versions={W: "null", C: "null"})
    )
    assert sources.parse(by_etag)._etags == {W: '"e2"', C: '"e1"'}  # type: ignore[attr-defined]
    assert source.describe() == "s3://bucket/runs/a"


def test_http_messages_carry_no_query_strings(sources: Sources) -> None:
    source = sources.parse("https://example.com/a/?X-Amz-Signature=secret")
    assert source.describe() == "https://example.com/a/"
    assert isinstance(source, HttpSource)
    assert source.file_url(W) == f"https://example.com/a/{W}?X-Amz-Signature=secret"


def test_hub_revision_default(sources: Sources) -> None:
    source = sources.parse("hf://org/repo")
    assert source.describe() == "hf://org/repo@main"
    assert source.pinned(Fetched(sha256="0" * 64, versions={W: "abc"})) == "hf://org/repo@abc"
