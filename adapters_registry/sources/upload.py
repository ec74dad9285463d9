"""Uploaded files: the adapter's two files sent in the request (they have no other home,
so, like local folders, they are kept in the registry's own store)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from adapters_registry.errors import MalformedAdapter
from adapters_registry.sources.base import (
    ADAPTER_FILES,
    Deadline,
    Fetched,
    Source,
    cap_for,
    write_capped,
)
from adapters_registry.validate import WEIGHTS_FILE


class UploadSource(Source):
    remote = False

    def __init__(self, files: dict[str, BinaryIO]) -> None:
        names = set(files)
        if names != set(ADAPTER_FILES):
            raise MalformedAdapter(
                f"upload must contain exactly {list(ADAPTER_FILES)}, got {sorted(names)}"
            )
        self.files = files

    def describe(self) -> str:
        return "upload"

    def pinned(self, fetched: Fetched) -> str:
        return "upload"

    def fetch(self, dest: Path, *, max_bytes: int, deadline: Deadline) -> Fetched:
        sha = ""
        for name, stream in self.files.items():
            digest = write_capped(stream, dest / name, cap_for(name, max_bytes), f"uploaded {name}")
            if name == WEIGHTS_FILE:
                sha = digest
        return Fetched(sha256=sha)
