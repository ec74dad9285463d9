"""Build small synthetic base models and PEFT adapters on disk, for registry tests.

Weights are written with safetensors' numpy API (tiny shapes), so these tests need
neither torch nor the demo model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HIDDEN, INTER, LAYERS, KV = 16, 32, 2, 8
MODULES = {  # kind -> (out, in)
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTER, HIDDEN),
    "up_proj": (INTER, HIDDEN),
    "down_proj": (HIDDEN, INTER),
}
_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def module_path(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{_PARENT[kind]}.{kind}"


def make_base(path: Path, layers: int = LAYERS, hidden_scale: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"model.embed_tokens.weight": np.zeros((64, HIDDEN * hidden_scale), np.float32)}
    for layer in range(layers):
        for kind, (out_f, in_f) in MODULES.items():
            shape = (out_f * hidden_scale, in_f * hidden_scale)
            tensors[module_path(layer, kind) + ".weight"] = np.zeros(shape, np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    return path


def make_adapter(
    path: Path,
    *,
    rank: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    layers: int = LAYERS,
    hidden_scale: int = 1,
    config_overrides: dict[str, object] | None = None,
    seed: int = 0,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for kind in targets:
            out_f, in_f = (d * hidden_scale for d in MODULES[kind])
            prefix = f"base_model.model.{module_path(layer, kind)}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, in_f), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, rank), np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config: dict[str, object] = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "base_model_name_or_path": "tiny",
        "bias": "none",
    }
    config.update(config_overrides or {})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path
