"""hf://org/repo[@revision]: an adapter repository on the Hugging Face hub.

Off unless `sources.hf_enabled` (most deployments cannot reach the hub). The revision
(a branch, tag or commit; default main) is resolved to its commit at registration and
that commit is recorded, so a later push to the repository cannot change a registered
version. Sizes are checked from the hub's file metadata before anything is downloaded.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from adapters_registry.errors import AdapterError, AdapterTooLarge, InvalidSource
from adapters_registry.sources.base import (
    ADAPTER_FILES,
    Deadline,
    Fetched,
    Source,
    SourcesConfig,
    cap_for,
    write_capped,
)
from adapters_registry.validate import WEIGHTS_FILE

_URI = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+))?/?$")


class HfSource(Source):
    def __init__(self, uri: str, config: SourcesConfig) -> None:
        if not config.hf_enabled:
            raise InvalidSource("hf:// sources are disabled (setting sources.hf_enabled)")
        match = _URI.match(uri)
        if match is None:
            raise InvalidSource("unsupported hub source: use hf://org/repo[@revision]")
        self.repo = match["repo"]
        self.revision = match["rev"] or "main"
        self.config = config

    def describe(self) -> str:
        return f"hf://{self.repo}@{self.revision}"

    def pinned(self, fetched: Fetched) -> str:
        commit = fetched.versions.get(WEIGHTS_FILE, self.revision)
        return f"hf://{self.repo}@{commit}"

    def fetch(self, dest: Path, *, max_bytes: int, deadline: Deadline) -> Fetched:
        try:
            return self._fetch(dest, max_bytes, deadline)
        except AdapterError:
            raise
        except Exception as exc:  # the hub client's HTTP and repository errors
            raise InvalidSource(f"{self.describe()}: {type(exc).__name__}") from exc

    def _fetch(self, dest: Path, max_bytes: int, deadline: Deadline) -> Fetched:
        from huggingface_hub import HfApi, hf_hub_download

        api: Any = HfApi(endpoint=self.config.hf_endpoint)
        info = api.model_info(
            self.repo, revision=self.revision, files_metadata=True, timeout=deadline.remaining()
        )
        commit = str(info.sha)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        sha = ""
        for name in ADAPTER_FILES:
            if name not in sizes:
                raise InvalidSource(f"{self.describe()} has no {name}")
            cap = cap_for(name, max_bytes)
            if sizes[name] is not None and sizes[name] > cap:
                raise AdapterTooLarge(f"{name} is {sizes[name]} bytes, above the cap of {cap}")
            with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
                path = hf_hub_download(
                    self.repo,
                    name,
                    revision=commit,
                    local_dir=tmp,
                    endpoint=self.config.hf_endpoint,
                    etag_timeout=deadline.remaining(),
                )
                with open(path, "rb") as stream:
                    digest = write_capped(stream, dest / name, cap, name, deadline=deadline)
            if name == WEIGHTS_FILE:
                sha = digest
        return Fetched(sha256=sha, versions={n: commit for n in ADAPTER_FILES})
