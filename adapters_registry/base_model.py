"""What an adapter must fit: the base model's linear layers and their shapes.

Read from the base checkpoint's safetensors headers rather than from config.json, so
the check holds for any architecture vLLM serves, and for quantized checkpoints too.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from adapters_registry.errors import MalformedAdapter
from adapters_registry.safetensors_header import read_header


@dataclass(frozen=True)
class BaseModelShapes:
    """Module path (e.g. ``model.layers.0.self_attn.q_proj``) -> (out_features, in_features)."""

    name: str
    linear: dict[str, tuple[int, int]] = field(repr=False)

    @property
    def module_kinds(self) -> frozenset[str]:
        """Last path component of every linear module: q_proj, down_proj, lm_head..."""
        return frozenset(path.rsplit(".", 1)[-1] for path in self.linear)

    @classmethod
    def from_dir(cls, model_dir: Path, name: str) -> BaseModelShapes:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise MalformedAdapter(f"base model {model_dir} has no .safetensors files")
        linear: dict[str, tuple[int, int]] = {}
        for path in files:
            header = read_header(path)
            for key, info in header.items():
                if key.endswith(".weight") and len(info.shape) == 2:
                    out_f, in_f = info.shape
                    linear[key.removesuffix(".weight")] = (out_f, in_f)
                elif key.endswith(".weight_shape"):
                    # compressed-tensors packed weights store the logical shape as a
                    # tiny int tensor; read its two values straight from the file.
                    linear[key.removesuffix(".weight_shape")] = _read_shape(
                        path, info.offset, info.dtype
                    )
        _add_tied_lm_head(model_dir, linear)
        return cls(name=name, linear=linear)


def _read_shape(path: Path, offset: int, dtype: str) -> tuple[int, int]:
    fmt = {"I64": "<2q", "I32": "<2i"}.get(dtype)
    if fmt is None:
        raise MalformedAdapter(f"{path.name}: unexpected weight_shape dtype {dtype}")
    with path.open("rb") as f:
        f.seek(offset)
        out_f, in_f = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
    return int(out_f), int(in_f)


def _add_tied_lm_head(model_dir: Path, linear: dict[str, tuple[int, int]]) -> None:
    # Tied embeddings have no lm_head tensor; its shape is the embedding's.
    if "lm_head" in linear or "model.embed_tokens" not in linear:
        return
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    if config.get("tie_word_embeddings"):
        linear["lm_head"] = linear["model.embed_tokens"]
