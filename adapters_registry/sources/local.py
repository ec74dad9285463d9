"""A folder inside the configured roots, copied into the registry's store at registration.

Copying (rather than serving the folder in place) is what makes a version immutable:
what was validated is what the engine reads, whatever happens to the folder later. The
files are opened without following symlinks (O_NOFOLLOW) inside the folder's real
location, itself confined to the roots: a weights file that is a link to somewhere else
is refused, not followed.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from adapters_registry.errors import (
    InvalidSource,
    MalformedAdapter,
    PathOutsideRoots,
    UnsafeFormat,
)
from adapters_registry.paths import confine
from adapters_registry.sources.base import (
    ADAPTER_FILES,
    Deadline,
    Fetched,
    Source,
    cap_for,
    write_capped,
)
from adapters_registry.validate import PICKLE_SUFFIXES, WEIGHTS_FILE


class LocalSource(Source):
    remote = False

    def __init__(self, path: str, roots: Iterable[Path]) -> None:
        self.spelled = path
        self.path = confine(Path(path), roots)

    def describe(self) -> str:
        return self.spelled

    def pinned(self, fetched: Fetched) -> str:
        return self.spelled

    def fetch(self, dest: Path, *, max_bytes: int, deadline: Deadline) -> Fetched:
        if not self.path.is_dir():
            raise InvalidSource(f"no adapter folder at {self.spelled!r}")
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFormat(
                f"{', '.join(pickles)} may contain a pickle; only safetensors weights are "
                "accepted (re-save with safe_serialization=True)"
            )
        sha = ""
        for name in ADAPTER_FILES:
            with _open_plain(self.path / name) as stream:
                digest = write_capped(
                    stream, dest / name, cap_for(name, max_bytes), name, deadline=deadline
                )
            if name == WEIGHTS_FILE:
                sha = digest
        return Fetched(sha256=sha)


def _open_plain(path: Path) -> io.FileIO:
    """Open a regular file that is not a symlink (the folder is already confined)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MalformedAdapter(f"missing {path.name}") from None
    except OSError as exc:
        if path.is_symlink():
            raise PathOutsideRoots(
                f"{path.name} is a symbolic link: refused (copy the file into the folder)"
            ) from exc
        raise InvalidSource(f"cannot read {path.name}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MalformedAdapter(f"{path.name} is not a regular file")
    return io.FileIO(fd, "rb")
