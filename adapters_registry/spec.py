"""AdapterSpec: everything known about one adapter version once it has been validated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
