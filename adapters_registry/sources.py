"""Where adapter files come from, turned into a verified local folder.

- a path inside the configured roots (used in place; its sha256 is checked at each load)
- an http(s) URL of a folder holding adapter_config.json + adapter_model.safetensors,
  downloaded into a size-capped LRU disk cache keyed by the weights' sha256
- uploaded files, kept in the registry's own storage (they have no other home)

Downloads and uploads are written to a private staging folder first and only moved into
place after validation, so a failure leaves no stray files behind. Downloads are staged
outside the capped cache folder (in a sibling, on the same filesystem, so moving one in
is a rename), and room is made before one moves in: the cache folder never holds more
than its cap.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from adapters_registry.errors import AdapterTooLarge, CacheFull, InvalidSource, MalformedAdapter
from adapters_registry.validate import CONFIG_FILE, WEIGHTS_FILE

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
_CONFIG_MAX_BYTES = 1024 * 1024
_CHUNK = 1 << 20
# Older versions kept each entry's last use in this file; now it is the folder's mtime.
_LEGACY_USED_MARK = ".last-used"


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


@contextmanager
def staging(root: Path) -> Iterator[Path]:
    """A fresh private folder under `root`, removed on exit whatever happens."""
    path = root / f".staging-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def copy_capped(src: BinaryIO, dest: Path, cap: int, what: str) -> int:
    """Copy a stream to `dest`, refusing it as soon as it passes `cap` bytes."""
    total = 0
    with dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            total += len(chunk)
            if total > cap:
                raise AdapterTooLarge(f"{what} is larger than the cap of {cap} bytes")
            out.write(chunk)
    return total


def download(url: str, dest: Path, *, max_bytes: int, timeout_s: float = 60.0) -> None:
    """Fetch the two adapter files of the folder at `url` into `dest`."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise InvalidSource(f"malformed source URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidSource(f"unsupported source URL {url!r}: use http(s)://host/path")
    base = url if url.endswith("/") else url + "/"
    for name, cap in ((CONFIG_FILE, _CONFIG_MAX_BYTES), (WEIGHTS_FILE, max_bytes)):
        file_url = urllib.parse.urljoin(base, name)
        try:
            # urlopen also follows redirects; only http(s) handlers are installed by default.
            with urllib.request.urlopen(file_url, timeout=timeout_s) as response:
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > cap:
                    raise AdapterTooLarge(f"{file_url} is {length} bytes, above the cap of {cap}")
                copy_capped(response, dest / name, cap, file_url)
        except urllib.error.HTTPError as exc:
            raise InvalidSource(f"downloading {file_url} failed: HTTP {exc.code}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InvalidSource(f"downloading {file_url} failed: {reason}") from exc


def save_upload(files: dict[str, BinaryIO], dest: Path, *, max_bytes: int) -> None:
    """Write uploaded adapter files into `dest`; exactly the two adapter files."""
    names = set(files)
    if names != set(ADAPTER_FILES):
        raise MalformedAdapter(
            f"upload must contain exactly {list(ADAPTER_FILES)}, got {sorted(names)}"
        )
    for name, stream in files.items():
        cap = _CONFIG_MAX_BYTES if name == CONFIG_FILE else max_bytes
        copy_capped(stream, dest / name, cap, f"uploaded {name}")


class DiskCache:
    """Downloaded adapters by sha256, total size capped, least recently used evicted.

    `in_use` names entries that must survive eviction (adapters the engine may reload
    from disk); an entry that alone exceeds the cap is refused before it is stored.
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
        # Replaceable: the server's adapter router connects itself here.
        self.in_use = in_use
        # A sibling by default: same filesystem, so `put` moves a download in atomically.
        self.staging_root = staging_root or root.with_name("staging")
        self._lock = threading.Lock()  # evict + move in, one download at a time
        root.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)

    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A private folder to download into, outside the capped folder."""
        return staging(self.staging_root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def get(self, sha256: str) -> Path | None:
        path = self.path(sha256)
        if not (path / WEIGHTS_FILE).is_file():
            return None
        _touch(path)
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
        return [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _touch(path: Path) -> None:
    """Mark `path` as just used: its mtime (no file of its own, so no byte over the cap)."""
    with contextlib.suppress(OSError):
        (path / _LEGACY_USED_MARK).unlink(missing_ok=True)
    os.utime(path)


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
