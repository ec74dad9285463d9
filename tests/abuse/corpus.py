"""A corpus of bad adapters: each builder turns a valid PEFT folder into one hostile or
broken variant, in place. The abuse suite sends each through the real HTTP API; the
numeric ones are also checked at the validator (tests/unit/test_numeric_checks.py)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def set_config(folder: Path, **fields: object) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(fields)
    (folder / CONFIG).write_text(json.dumps(config))


def poke_tensor(folder: Path, value: float, index: int = 0) -> str:
    """Put `value` into one element of one tensor; the tensor's name."""
    tensors = load_file(str(folder / WEIGHTS))
    name = sorted(tensors)[index]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[3] = value
    save_file(tensors, str(folder / WEIGHTS))
    return name


def write_raw_safetensors(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def to_bf16(folder: Path, nan_in: str | None = None) -> str:
    """Re-save the weights as BF16 (numpy has no bf16: by hand), NaN in one tensor."""
    tensors = load_file(str(folder / WEIGHTS))
    header: dict[str, object] = {}
    chunks = []
    offset = 0
    victim = nan_in or sorted(tensors)[0]
    for name in sorted(tensors):
        values = tensors[name].astype(np.float32)
        if name == victim and nan_in is not None:
            values.flat[0] = np.nan
        bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(values.shape),
            "data_offsets": [offset, offset + len(bf16)],
        }
        chunks.append(bf16)
        offset += len(bf16)
    write_raw_safetensors(folder / WEIGHTS, header, b"".join(chunks))
    return victim


@dataclass(frozen=True)
class Case:
    """One bad adapter: what to do to a valid folder, and the answer expected."""

    id: str
    spoil: Callable[[Path, Path], object]  # (adapter folder, a folder outside the roots)
    status: int
    code: str
    message: str = ""  # a fragment the error message must contain
    # The refusal is implemented on another branch: expected to fail here until merged.
    # Other (status, code) answers that are as right (the branch doing it picks one).
    also: tuple[tuple[int, str], ...] = ()


def _truncate(folder: Path, _: Path) -> None:
    w = folder / WEIGHTS
    w.write_bytes(w.read_bytes()[:-10])


def _huge_header(folder: Path, _: Path) -> None:
    # Valid JSON, valid tensors, 2 MiB of metadata: parsed in full by the old 100 MB cap.
    tensors = load_file(str(folder / WEIGHTS))
    save_file(tensors, str(folder / WEIGHTS), metadata={"pad": "x" * (2 << 20)})


def _pickle(folder: Path, _: Path) -> None:
    (folder / WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")


def _symlinked_weights(folder: Path, outside: Path) -> None:
    (folder / WEIGHTS).replace(outside / WEIGHTS)
    os.symlink(outside / WEIGHTS, folder / WEIGHTS)


def _symlinked_config(folder: Path, outside: Path) -> None:
    (folder / CONFIG).replace(outside / CONFIG)
    os.symlink(outside / CONFIG, folder / CONFIG)


def _foreign_base(folder: Path, outside: Path) -> None:
    from tests.adapters import make_adapter

    wide = make_adapter(outside / "wide", hidden_scale=2)
    (folder / WEIGHTS).write_bytes((wide / WEIGHTS).read_bytes())


def _unknown_module(folder: Path, _: Path) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    renamed = {k.replace("q_proj", "zz_proj"): v for k, v in tensors.items()}
    save_file(renamed, str(folder / WEIGHTS))
    set_config(folder, target_modules=["zz_proj", "v_proj"])


def _fifo(folder: Path, _: Path) -> None:
    (folder / WEIGHTS).unlink()
    os.mkfifo(folder / WEIGHTS)


# A symlinked file is refused as outside the roots, or as an unsafe or malformed adapter.
_SYMLINK_REFUSALS = (
    (422, "adapter_malformed"),
    (422, "adapter_unsafe_format"),
    (400, "invalid_source"),
)

CASES = (
    Case("truncated", _truncate, 422, "adapter_malformed", "truncated"),
    Case("huge-header", _huge_header, 422, "adapter_malformed", "above the cap"),
    Case("pickle", _pickle, 422, "adapter_unsafe_format", "adapter_model.bin"),
    Case("nan", lambda f, _: poke_tensor(f, float("nan")), 422, "adapter_malformed", "NaN"),
    Case("inf", lambda f, _: poke_tensor(f, float("inf")), 422, "adapter_malformed", "infinite"),
    Case(
        "absurd-magnitude",
        lambda f, _: poke_tensor(f, 3.0e9, index=1),
        422,
        "adapter_malformed",
        "magnitude",
    ),
    Case("bf16-nan", lambda f, _: to_bf16(f, nan_in=""), 422, "adapter_malformed", "NaN"),
    Case(
        "alpha-inf",
        lambda f, _: (f / CONFIG).write_text(
            (f / CONFIG).read_text().replace('"lora_alpha": 16', '"lora_alpha": 1e400')
        ),
        422,
        "adapter_malformed",
        "lora_alpha",
    ),
    Case("alpha-zero", lambda f, _: set_config(f, lora_alpha=0), 422, "adapter_malformed"),
    Case("alpha-negative", lambda f, _: set_config(f, lora_alpha=-16), 422, "adapter_malformed"),
    Case("alpha-huge", lambda f, _: set_config(f, lora_alpha=1e30), 422, "adapter_malformed"),
    Case("rank-huge", lambda f, _: set_config(f, r=10**30), 422, "adapter_rank_too_large"),
    Case("rank-mismatch", lambda f, _: set_config(f, r=4), 422, "adapter_incompatible", "r=4"),
    Case("foreign-base", _foreign_base, 422, "adapter_incompatible", "different base"),
    Case("unknown-module", _unknown_module, 422, "adapter_incompatible", "zz_proj"),
    Case(
        "undeclared-targets",
        lambda f, _: set_config(f, target_modules=["q_proj"]),
        422,
        "adapter_malformed",
        "target_modules",
    ),
    Case("peft-ia3", lambda f, _: set_config(f, peft_type="IA3"), 422, "adapter_unsupported"),
    Case(
        "peft-prefix",
        lambda f, _: set_config(f, peft_type="PREFIX_TUNING"),
        422,
        "adapter_unsupported",
    ),
    Case("dora", lambda f, _: set_config(f, use_dora=True), 422, "adapter_unsupported"),
    Case(
        "symlinked-weights",
        _symlinked_weights,
        403,
        "path_outside_roots",
        also=_SYMLINK_REFUSALS,
    ),
    Case(
        "symlinked-config",
        _symlinked_config,
        403,
        "path_outside_roots",
        also=_SYMLINK_REFUSALS,
    ),
    Case("fifo", _fifo, 422, "adapter_malformed", WEIGHTS),
)
