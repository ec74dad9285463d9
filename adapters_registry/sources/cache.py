"""The capped LRU disk cache of downloaded adapters, and private staging folders.

Downloads are written to a private staging folder first and only moved into place after
validation, so a failure leaves no stray files behind. They are staged outside the
capped cache folder (in a sibling, on the same filesystem, so moving one in is a
rename), and room is made before one moves in: the cache folder never holds more than
its cap. Staging folders are named after the process that made them, so that a later
start can tell a crash's leftovers from another live replica's work (`sweep_staging`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters_registry.errors import AdapterTooLarge, CacheFull
from adapters_registry.sources.base import fsync_dir
from adapters_registry.validate import WEIGHTS_FILE

_STAGING_PREFIX = ".staging-"
# Older versions kept each entry's last use in this file; now it is the folder's mtime.
_LEGACY_USED_MARK = ".last-used"


@contextmanager
def staging(root: Path) -> Iterator[Path]:
    """A fresh private folder under `root`, removed on exit whatever happens."""
    path = root / f"{_STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class DiskCache:
    """Downloaded adapters by sha256, total size capped, least recently used evicted.

    `in_use` names entries that must survive eviction (adapters the engine may reload
    from disk), as each reader of the files tells it (`add_reader`); an entry that alone
    exceeds the cap is refused before it is stored.
    Every byte under `root` is a cached adapter file (downloads are staged in
    `staging_root`, last use is the entry folder's mtime), so `usage()` is what the
    folder holds, and it never exceeds `max_bytes`.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        in_use: Callable[[], set[str]],
        staging_root: Path | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._readers = [in_use]
        # A sibling by default: same filesystem, so `put` moves a download in atomically.
        self.staging_root = staging_root or root.with_name("staging")
        self._lock = threading.Lock()  # evict + move in, one download at a time
        root.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)

    def add_reader(self, in_use: Callable[[], set[str]]) -> None:
        """Protect from eviction, from now on, the entries `in_use()` names (e.g. the
        server's LoRA pool: the versions its engine may read again)."""
        self._readers.append(in_use)

    def in_use(self) -> set[str]:
        """The entries some reader may still read: never evicted."""
        return set().union(*(reader() for reader in self._readers))

    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A private folder to download into, outside the capped folder."""
        return staging(self.staging_root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def get(self, sha256: str) -> Path | None:
        path = self.path(sha256)
        # An entry evicted between the check and the touch is a miss, not an error.
        if not (path / WEIGHTS_FILE).is_file() or not _touch(path):
            return None
        return path

    def put(self, staged: Path, sha256: str) -> Path:
        """Move the folder `staged` (under `staging_root`) in as entry `sha256`, evicting
        least recently used entries first so that the cap holds at every moment."""
        size = _size(staged)
        if size > self.max_bytes:
            raise AdapterTooLarge(
                f"adapter is {size} bytes, above the download cache cap of {self.max_bytes}"
            )
        with self._lock:
            if self.get(sha256) is not None:  # already there (a concurrent download)
                shutil.rmtree(staged, ignore_errors=True)
                return self.path(sha256)
            self._evict(need=size, keep={sha256})
            if self.usage() + size > self.max_bytes:
                raise CacheFull(
                    f"the download cache ({self.max_bytes} bytes) is full of adapters in "
                    "use; try again shortly"
                )
            target = self.path(sha256)
            shutil.rmtree(target, ignore_errors=True)  # a partial entry, if any
            os.replace(staged, target)
            fsync_dir(self.root)
            _touch(target)
        return target

    def has(self, sha256: str) -> bool:
        """Whether entry `sha256` is cached (without marking it used)."""
        return (self.path(sha256) / WEIGHTS_FILE).is_file()

    def fits(self, size: int) -> bool:
        """Whether `size` more bytes would fit once every entry not in use is evicted."""
        protected = self.in_use()
        held = sum(_size(p) for p in self._entries() if p.name in protected)
        return held + size <= self.max_bytes

    def remove(self, sha256: str) -> None:
        shutil.rmtree(self.path(sha256), ignore_errors=True)

    def usage(self) -> int:
        return sum(_size(p) for p in self._entries())

    def evict(self, *, need: int = 0, keep: set[str] | None = None) -> list[str]:
        """Remove least recently used entries until `need` more bytes fit under the cap."""
        with self._lock:
            return self._evict(need=need, keep=keep)

    def _evict(self, *, need: int, keep: set[str] | None) -> list[str]:
        protected = (keep or set()) | self.in_use()
        entries = sorted(self._entries(), key=_last_used)
        total = sum(_size(p) for p in entries)
        evicted = []
        for entry in entries:
            if total + need <= self.max_bytes:
                break
            if entry.name in protected:
                continue
            total -= _size(entry)
            shutil.rmtree(entry, ignore_errors=True)
            evicted.append(entry.name)
        return evicted

    def _entries(self) -> list[Path]:
        return [p for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir()]


def _touch(path: Path) -> bool:
    """Mark `path` as just used: its mtime (no file of its own, so no byte over the cap).
    False if it is gone (evicted meanwhile)."""
    with contextlib.suppress(OSError):
        (path / _LEGACY_USED_MARK).unlink(missing_ok=True)
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    """Bytes in the entry `path`; 0 if it is evicted while we look (a concurrent remove)."""
    total = 0
    try:
        for p in path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if p.is_file():
                    total += p.stat().st_size
    except FileNotFoundError:
        return 0
    return total


def sweep_staging(root: Path) -> list[Path]:
    """Remove staging folders under `root` left by processes of this host that are gone
    (a kill -9 mid-download); those of live processes (other replicas) stay."""
    removed = []
    host = socket.gethostname()
    for path in root.glob(f"{_STAGING_PREFIX}*"):
        owner = path.name[len(_STAGING_PREFIX) :].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and _alive(int(owner[1])):
            continue
        if len(owner) == 3 and owner[0] != host:
            continue  # another host's (shared storage): not ours to judge
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
