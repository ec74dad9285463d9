"""The one interface every kind of adapter source implements, and what they share.

A source names a PEFT folder (adapter_config.json + adapter_model.safetensors) somewhere:
a local path, an http(s) URL, an S3 prefix, a hub repository. `fetch` copies its two
files into a private staging folder, within a size cap and a total deadline, and
reports what it fetched (`Fetched`): the weights' sha256 always, and the store's own
identity of the objects (ETag, object version, commit) where it has one. `pinned` is the
source string to record, so that a later fetch gets exactly these objects again, or
fails with SourceChanged. Every failure is one of our typed errors (errors.py).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from adapters_registry.errors import AdapterTooLarge, InsufficientStorage, InvalidSource
from adapters_registry.validate import CONFIG_FILE, WEIGHTS_FILE

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
CONFIG_MAX_BYTES = 1024 * 1024
CHUNK = 1 << 20

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SourcesConfig:
    """Operator settings of the sources (server/settings.py `sources`, passed down)."""

    # Total time one fetch (both files) may take, connection and every read included.
    download_timeout_s: float = 300.0
    # Downloads run in their own bounded pool, never in the server's default executor.
    download_workers: int = 4
    # http(s) sources may only reach public addresses; these networks are allowed too
    # (e.g. "10.0.0.0/8" for an internal file server, "127.0.0.1/32" in tests).
    http_allowed_networks: tuple[str, ...] = ()
    http_max_redirects: int = 5
    # s3:// sources: credentials come from the standard chain (environment, profile,
    # instance role); `s3_anonymous` sends unsigned requests (public buckets).
    s3_endpoint_url: str | None = None  # MinIO, SeaweedFS, Ceph, R2...
    s3_region: str | None = None
    s3_profile: str | None = None
    s3_anonymous: bool = False
    # hf:// sources need the hub, which most deployments cannot reach: off by default.
    hf_enabled: bool = False
    hf_endpoint: str | None = None
    networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.http_allowed_networks)
        except ValueError as exc:
            raise ValueError(f"sources.http_allowed_networks: {exc}") from exc
        object.__setattr__(self, "networks", nets)


@dataclass(frozen=True)
class Fetched:
    """What a fetch brought: the immutable identity of the content."""

    sha256: str  # of adapter_model.safetensors, computed while writing it
    # Per file: the store's identity of the object (ETag, version id, commit), if any.
    etags: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


class Deadline:
    """A total time budget; every blocking step asks for what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise InvalidSource(f"the download took longer than its deadline of {self.seconds:g} s")
        return left


class Source(ABC):
    """One place adapters come from; `parse_source` picks the kind from the string."""

    # Whether fetched files go to the download cache (they can be fetched again) rather
    # than to the registry's own store (local paths, uploads: copied once, kept).
    remote: bool = True

    @abstractmethod
    def fetch(self, dest: Path, *, max_bytes: int, deadline: Deadline) -> Fetched:
        """Copy the adapter's two files into the (empty) folder `dest`; weights above
        `max_bytes` are refused (AdapterTooLarge) as soon as that is known."""

    @abstractmethod
    def pinned(self, fetched: Fetched) -> str:
        """The source string to record: names exactly what `fetched` got."""

    @abstractmethod
    def describe(self) -> str:
        """The source for messages: no credentials, no query strings."""


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def write_capped(
    read: Readable | None,
    dest: Path,
    cap: int,
    what: str,
    *,
    deadline: Deadline | None = None,
    chunks: Iterable[bytes] | None = None,
) -> str:
    """Stream to `dest` (fsynced), refusing it once past `cap` bytes; its sha256.

    Either `read` (a file-like object) or `chunks`; the deadline is checked between reads.
    """
    digest = hashlib.sha256()
    total = 0
    source = chunks if chunks is not None else _chunks(read)
    with storage_errors(), dest.open("xb") as out:
        for chunk in source:
            if deadline is not None:
                deadline.remaining()
            total += len(chunk)
            if total > cap:
                raise AdapterTooLarge(f"{what} is larger than the cap of {cap} bytes")
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def storage_errors() -> Iterator[None]:
    """Our disk full (or over quota) as InsufficientStorage. Here, because every source
    writes through write_capped and catches OSError as a *download* failure (a 400 that
    blames the request); the registry wraps its other writes (staging, moves) too."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise InsufficientStorage(
                "no disk space left for adapter files on the server; free some space "
                "(or unregister adapters) and try again"
            ) from exc
        raise


def _chunks(read: Readable | None) -> Iterable[bytes]:
    assert read is not None
    while chunk := read.read(CHUNK):
        yield chunk


def fsync_dir(path: Path) -> None:
    """Make a rename into (or a file creation in) `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cap_for(name: str, max_bytes: int) -> int:
    return CONFIG_MAX_BYTES if name == CONFIG_FILE else max_bytes
