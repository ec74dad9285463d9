"""What identifies an adapter's content: its weights *and* the config that scales them.

The weights' sha256 alone does not pin what is served: `lora_alpha`, `use_rslora`, the
target list or a rank pattern change the output of the same tensors. A version therefore
pins a canonical digest of the config fields that change the math, and the registry
keys what it stores, and the router what it keeps resident, by the two together.

Canonical: fields absent from the file take the value the validator and the engine use
for them (so adding `"use_rslora": false` changes nothing), numbers compare by value
(16 == 16.0), target lists by set. Fields that do not change what is served (dropout,
init, task type, the base's name, free metadata) are left out, so re-saving an adapter
with other metadata is still the same content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Each field that changes what a LoRA computes, with the value its absence means.
_MATH_FIELDS: dict[str, Any] = {
    "peft_type": "LORA",
    "r": None,
    "lora_alpha": None,  # the validator's default is `r`
    "use_rslora": False,
    "target_modules": None,
    "exclude_modules": None,
    "rank_pattern": None,
    "alpha_pattern": None,
    "use_dora": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "layer_replication": None,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
}
_CONTENT_TAG = b"loraswap-content-v1"


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical form of `config`'s math fields."""
    canonical = {}
    for key, default in _MATH_FIELDS.items():
        value = config.get(key, default)
        if key == "lora_alpha" and value is None:
            value = config.get("r")
        canonical[key] = _canonical(value, default)
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def content_digest(weights_sha256: str, config_sha256: str | None) -> str:
    """The identity of weights + config (sha256 hex). None for the config (versions
    registered before configs were pinned) leaves the weights' sha256, the old key."""
    if config_sha256 is None:
        return weights_sha256
    digest = hashlib.sha256(_CONTENT_TAG)
    digest.update(b"\0" + weights_sha256.encode() + b"\0" + config_sha256.encode())
    return digest.hexdigest()


def _canonical(value: Any, default: Any) -> Any:
    if value in (None, [], {}, "") and default is None:
        return None  # "no pattern" spelled any way
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)  # 16 and 16.0 scale alike
    if isinstance(value, list):
        items = [_canonical(v, None) for v in value]
        # Target and module lists are sets; layer lists sorted too (order is meaningless).
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict):
        return {str(k): _canonical(v, None) for k, v in value.items()}
    return value
