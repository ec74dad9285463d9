"""Every validation rule refuses its case with the exact problem named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapters_registry import (
    AdapterNotFound,
    AdapterSpec,
    AdapterTooLarge,
    BaseModelShapes,
    DirectoryCatalog,
    IncompatibleAdapter,
    InvalidAdapterName,
    Limits,
    MalformedAdapter,
    PathOutsideRoots,
    RankTooLarge,
    UnsafeFormat,
    UnsupportedAdapter,
    inspect_adapter,
)
from tests.adapters import make_adapter, make_base

LIMITS = Limits(max_rank=16, max_bytes=10_000_000)


@pytest.fixture
def base(tmp_path: Path) -> BaseModelShapes:
    return BaseModelShapes.from_dir(make_base(tmp_path / "base"), "tiny")


def check(
    path: Path, base: BaseModelShapes, limits: Limits = LIMITS, sha: str | None = None
) -> AdapterSpec:
    return inspect_adapter(path, name="a", base=base, limits=limits, expected_sha256=sha)


def test_valid_adapter_gives_full_spec(tmp_path: Path, base: BaseModelShapes) -> None:
    spec = check(make_adapter(tmp_path / "a", rank=8, targets=("q_proj", "down_proj")), base)
    assert (spec.rank, spec.alpha, spec.target_modules) == (8, 16.0, ("down_proj", "q_proj"))
    assert len(spec.sha256) == 64
    assert spec.size_bytes == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size


def test_base_shapes_include_tied_lm_head(base: BaseModelShapes) -> None:
    assert base.linear["lm_head"] == base.linear["model.embed_tokens"]
    assert base.linear["model.layers.1.mlp.down_proj"] == (16, 32)


def test_pickle_is_refused_without_being_read(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    # A real pickle would execute code on load; it must never be opened.
    (path / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")
    with pytest.raises(UnsafeFormat, match=r"adapter_model\.bin.*only safetensors"):
        check(path, base)


def test_pickle_beside_safetensors_is_refused(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a")
    (path / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(UnsafeFormat, match=r"optimizer\.pt"):
        check(path, base)


def test_truncated_safetensors(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(MalformedAdapter, match="truncated"):
        check(path, base)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "too short"),
        (b"\xff" * 8 + b"{}", "above the cap"),
        (b"\x04\x00\x00\x00\x00\x00\x00\x00nope", "not valid JSON"),
    ],
)
def test_garbage_safetensors(
    tmp_path: Path, base: BaseModelShapes, payload: bytes, message: str
) -> None:
    path = make_adapter(tmp_path / "a")
    (path / "adapter_model.safetensors").write_bytes(payload)
    with pytest.raises(MalformedAdapter, match=message):
        check(path, base)


def test_rank_above_engine_max(tmp_path: Path, base: BaseModelShapes) -> None:
    with pytest.raises(RankTooLarge, match="rank 32 exceeds the engine's max_lora_rank 16"):
        check(make_adapter(tmp_path / "a", rank=32), base)


def test_adapter_for_a_different_base(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a", hidden_scale=2)
    with pytest.raises(IncompatibleAdapter, match=r"q_proj has lora_A \[8, 32\]"):
        check(path, base)


def test_adapter_with_more_layers_than_base(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a", layers=3)
    with pytest.raises(IncompatibleAdapter, match=r"model\.layers\.2\..* does not exist"):
        check(path, base)


def test_rank_in_config_disagrees_with_tensors(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a", rank=8, config_overrides={"r": 4})
    with pytest.raises(IncompatibleAdapter, match="r=4"):
        check(path, base)


def test_targets_disagree_with_tensors(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a", config_overrides={"target_modules": ["q_proj"]})
    with pytest.raises(MalformedAdapter, match=r"tensors for \['v_proj'\]"):
        check(path, base)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_unsupported_features(
    tmp_path: Path, base: BaseModelShapes, override: dict[str, object], message: str
) -> None:
    with pytest.raises(UnsupportedAdapter, match=message):
        check(make_adapter(tmp_path / "a", config_overrides=override), base)


@pytest.mark.parametrize("config", ["not json", "[]", '{"r": 0}', '{"r": "8"}'])
def test_bad_config(tmp_path: Path, base: BaseModelShapes, config: str) -> None:
    path = make_adapter(tmp_path / "a")
    (path / "adapter_config.json").write_text(config)
    with pytest.raises(MalformedAdapter):
        check(path, base)


def test_size_cap(tmp_path: Path, base: BaseModelShapes) -> None:
    with pytest.raises(AdapterTooLarge, match="above the cap of 100"):
        check(make_adapter(tmp_path / "a"), base, Limits(max_rank=16, max_bytes=100))


def test_checksum(tmp_path: Path, base: BaseModelShapes) -> None:
    path = make_adapter(tmp_path / "a")
    good = check(path, base).sha256
    assert check(path, base, sha=good.upper()).sha256 == good
    with pytest.raises(MalformedAdapter, match="sha256 mismatch"):
        check(path, base, sha="0" * 64)


# -- the directory catalog --------------------------------------------------------------


def test_catalog_lists_valid_names_only(tmp_path: Path, base: BaseModelShapes) -> None:
    root = tmp_path / "adapters"
    make_adapter(root / "good")
    make_adapter(root / "Bad Name")
    (root / "file.txt").write_text("not an adapter")
    assert DirectoryCatalog(root, base, LIMITS).names() == ["good"]


@pytest.mark.parametrize("name", ["../base", "..", "a/b", "", "UPPER", "x" * 65])
def test_catalog_rejects_bad_names(tmp_path: Path, base: BaseModelShapes, name: str) -> None:
    with pytest.raises(InvalidAdapterName):
        DirectoryCatalog(tmp_path, base, LIMITS).get(name)


def test_catalog_refuses_symlink_escape(tmp_path: Path, base: BaseModelShapes) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    outside = make_adapter(tmp_path / "outside")
    os.symlink(outside, root / "escape")
    with pytest.raises(PathOutsideRoots):
        DirectoryCatalog(root, base, LIMITS).get("escape")


def test_catalog_missing_and_revalidation(tmp_path: Path, base: BaseModelShapes) -> None:
    root = tmp_path / "adapters"
    catalog = DirectoryCatalog(root, base, LIMITS)
    with pytest.raises(AdapterNotFound):
        catalog.get("later")
    path = make_adapter(root / "later", rank=8)
    first = catalog.get("later")
    # Changing the weights on disk is noticed: a new sha256, re-validated.
    make_adapter(path, rank=16)
    second = catalog.get("later")
    assert (first.rank, second.rank) == (8, 16)
    assert first.sha256 != second.sha256


def test_catalog_bad_adapter_does_not_affect_others(tmp_path: Path, base: BaseModelShapes) -> None:
    root = tmp_path / "adapters"
    make_adapter(root / "good")
    bad = make_adapter(root / "bad")
    (bad / "adapter_config.json").write_text(json.dumps({"r": 64, "target_modules": ["q_proj"]}))
    catalog = DirectoryCatalog(root, base, LIMITS)
    with pytest.raises(RankTooLarge):
        catalog.get("bad")
    with pytest.raises(RankTooLarge):  # cached, raised again (a fresh instance)
        catalog.get("bad")
    assert catalog.get("good").name == "good"
