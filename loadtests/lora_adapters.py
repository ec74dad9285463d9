"""Random PEFT LoRA adapters for any Llama/Qwen2-shaped base (benchmarks and tests).

Throughput does not depend on what an adapter says, and parity with PEFT holds for any
weights; what matters is their shapes, ranks and target modules, set here exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGET_SETS = {
    "qv": ("q_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    inter = config["intermediate_size"]
    return {  # module -> (out, in)
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def make_random_adapter(
    path: Path,
    config: dict[str, Any],
    rank: int,
    targets: tuple[str, ...],
    seed: int,
    b_std: float = 0.01,
) -> Path:
    """A PEFT LoRA folder with random weights for this base model's shapes (safetensors).

    A ~ N(0, 1/in) and B ~ N(0, b_std^2), alpha = rank (scaling 1): small b_std keeps the
    model's outputs sane for throughput runs; a larger one makes every adapter change
    greedy outputs visibly (parity tests). An existing folder is reused as it is.
    """
    import torch
    from safetensors.torch import save_file

    if (path / "adapter_model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = _module_shapes(config)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for kind in targets:
            out_f, in_f = shapes[kind]
            part = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{kind}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * b_std
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": rank,
                "target_modules": list(targets),
                "bias": "none",
                "base_model_name_or_path": str(config.get("_name_or_path", "")),
            }
        )
    )
    return path
