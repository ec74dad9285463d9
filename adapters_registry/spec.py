"""AdapterSpec: everything known about one adapter version once it has been validated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters_registry.digest import content_digest


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path  # the PEFT folder: adapter_config.json + adapter_model.safetensors
    base_model: str  # the served base name it was checked against
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    sha256: str  # of adapter_model.safetensors: identity of the weights
    size_bytes: int
    # of the adapter config fields that change the math (digest.config_digest)
    config_sha256: str | None = None

    @property
    def content_digest(self) -> str:
        """Weights and config together: what identifies this content (digest.py)."""
        return content_digest(self.sha256, self.config_sha256)
