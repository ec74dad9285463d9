"""Check an adapter folder before anything loads it.

The checks read adapter_config.json and the safetensors header first, then scan the
weights themselves (tensor by tensor, a block at a time) for NaN, infinities and absurd
magnitudes, so a hostile or broken adapter is refused before a single weight reaches the
engine, and the refusal names the exact problem (and tensor).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters_registry.base_model import BaseModelShapes
from adapters_registry.digest import config_digest
from adapters_registry.errors import (
    AdapterNotFound,
    AdapterTooLarge,
    ChecksumMismatch,
    IncompatibleAdapter,
    MalformedAdapter,
    RankTooLarge,
    UnsafeFormat,
    UnsupportedAdapter,
)
from adapters_registry.safetensors_header import TensorInfo, read_header
from adapters_registry.spec import AdapterSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Extensions that are (or usually wrap) Python pickles: never loaded, never accepted.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
# Modules a LoRA may not target here: vLLM serves LoRA on the linear layers only.
_UNSERVED_MODULES = frozenset({"embed_tokens", "lm_head"})
_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# The LoRA scale (lora_alpha / r, or / sqrt(r) with rsLoRA) at most: common adapters use
# 0.5..32; past this, activations overflow half precision and the output is garbage.
MAX_SCALING = 1024.0
# |weight| at most. Trained LoRA weights are well below 1; a value this large is an
# attack or a broken export, and its product with activations overflows float16.
MAX_ABS_WEIGHT = 1.0e4
# `r` above this is refused before anything else (the engine's own max_lora_rank, lower,
# is checked after): keeps every later computation on it in range.
_RANK_CEILING = 1 << 16
# Elements scanned per read: bounds the memory of the scan whatever the file's size.
_SCAN_BLOCK = 1 << 20
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}


@dataclass(frozen=True)
class Limits:
    max_rank: int
    max_bytes: int


def inspect_adapter(
    path: Path,
    *,
    name: str,
    base: BaseModelShapes,
    limits: Limits,
    expected_sha256: str | None = None,
) -> AdapterSpec:
    """Validate the PEFT folder at `path` against `base` and `limits`; return its spec."""
    if not path.is_dir():
        raise AdapterNotFound(f"adapter {name!r} not found", adapter=name)
    _refuse_pickles(path, name)
    config, config_sha256 = _read_config(path / CONFIG_FILE, name)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MalformedAdapter(f"adapter {name!r}: missing {WEIGHTS_FILE}", adapter=name)
    size = weights.stat().st_size
    if size > limits.max_bytes:
        raise AdapterTooLarge(
            f"adapter {name!r}: {WEIGHTS_FILE} is {size} bytes, above the cap of "
            f"{limits.max_bytes}",
            adapter=name,
        )
    rank = config["r"]
    if rank > limits.max_rank:
        raise RankTooLarge(
            f"adapter {name!r}: rank {rank} exceeds the engine's max_lora_rank {limits.max_rank}",
            adapter=name,
        )
    try:
        header = read_header(weights)
    except MalformedAdapter as exc:
        raise MalformedAdapter(f"adapter {name!r}: {exc.message}", adapter=name) from exc
    modules = _check_tensors(header, config, base, name)
    _scan_weights(weights, header, name)
    digest = _sha256(weights)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ChecksumMismatch(
            f"adapter {name!r}: sha256 mismatch: expected {expected_sha256}, got {digest}",
            adapter=name,
        )
    return AdapterSpec(
        name=name,
        path=path,
        base_model=base.name,
        rank=rank,
        alpha=float(config["lora_alpha"]),
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
        sha256=digest,
        size_bytes=size,
        config_sha256=config_sha256,
    )


def _refuse_pickles(path: Path, name: str) -> None:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFormat(
            f"adapter {name!r}: {', '.join(pickles)} may contain a pickle; only safetensors "
            "weights are accepted (re-save with safe_serialization=True)",
            adapter=name,
        )


def _read_config(path: Path, name: str) -> tuple[dict[str, Any], str]:
    """The checked config, and the digest of its math fields (digest.config_digest)."""
    try:
        config = json.loads(path.read_text(), parse_constant=_no_constant)
    except FileNotFoundError:
        raise MalformedAdapter(f"adapter {name!r}: missing {CONFIG_FILE}", adapter=name) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and NaN/Infinity; RecursionError deep nesting.
        raise MalformedAdapter(
            f"adapter {name!r}: {CONFIG_FILE} is not valid JSON", adapter=name
        ) from exc
    if not isinstance(config, dict):
        raise MalformedAdapter(f"adapter {name!r}: {CONFIG_FILE} is not an object", adapter=name)
    config = _check_config(config, name)
    # Of the fields as written (before the normalisation below): what a version pins.
    try:
        digest = config_digest(config)
    except (ValueError, OverflowError, RecursionError) as exc:  # 1e400 -> inf, 10**400
        raise MalformedAdapter(
            f"adapter {name!r}: {CONFIG_FILE} holds a number out of range", adapter=name
        ) from exc
    return _normalise_targets(config, name), digest


def _check_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    if config.get("peft_type", "LORA") != "LORA":
        raise _unsupported(name, f"peft_type {config.get('peft_type')!r}")
    _check_scale(config, name)
    _refuse_unsupported(config, name)
    return config


def _check_scale(config: dict[str, Any], name: str) -> None:
    """r, lora_alpha and use_rslora, and the LoRA scale they make; fills in lora_alpha."""
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise MalformedAdapter(f"adapter {name!r}: 'r' must be a positive integer", adapter=name)
    if rank > _RANK_CEILING:
        raise RankTooLarge(
            f"adapter {name!r}: rank {rank} is above any engine's maximum", adapter=name
        )
    alpha = config.get("lora_alpha", rank)
    # isfinite: JSON's 1e400 parses to inf, which passes `> 0` (review M5).
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not _finite(alpha)
        or alpha <= 0
    ):
        raise MalformedAdapter(
            f"adapter {name!r}: 'lora_alpha' must be a finite positive number, got {alpha!r}",
            adapter=name,
        )
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise MalformedAdapter(
            f"adapter {name!r}: 'use_rslora' must be true or false", adapter=name
        )
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    if scaling > MAX_SCALING:
        raise MalformedAdapter(
            f"adapter {name!r}: LoRA scale {scaling:g} (lora_alpha {alpha:g}, r {rank}) is "
            f"above {MAX_SCALING:g}",
            adapter=name,
        )
    config.setdefault("lora_alpha", alpha)


def _refuse_unsupported(config: dict[str, Any], name: str) -> None:
    """PEFT options that change what the weights mean in ways vLLM's LoRA does not do."""
    if config.get("use_dora"):
        raise _unsupported(name, "DoRA (use_dora)")
    if config.get("modules_to_save"):
        raise _unsupported(name, "modules_to_save")
    if config.get("bias", "none") != "none":
        raise _unsupported(name, f"bias={config.get('bias')!r}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise _unsupported(name, "rank_pattern/alpha_pattern")


def _unsupported(name: str, what: str) -> UnsupportedAdapter:
    return UnsupportedAdapter(f"adapter {name!r}: {what} is not supported", adapter=name)


def _normalise_targets(config: dict[str, Any], name: str) -> dict[str, Any]:
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets:
        # A regex over module paths: the tensor check against the base stands in for it.
        config["target_modules"] = None
        return config
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise MalformedAdapter(
            f"adapter {name!r}: 'target_modules' must be a non-empty list of names", adapter=name
        )
    config["target_modules"] = targets
    return config


def _finite(x: float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; a LoRA scale of either poisons every output.
    raise ValueError(f"{name} is not allowed")


def _check_tensors(
    header: dict[str, TensorInfo], config: dict[str, Any], base: BaseModelShapes, name: str
) -> set[str]:
    """Every tensor is a LoRA A/B of a linear layer of `base`, with the config's rank."""
    pairs = _pairs(header, name)
    for module, ab in sorted(pairs.items()):
        _check_pair(module, ab, config["r"], base, name)
    if config["target_modules"] is not None:
        _check_targets(config["target_modules"], {m.rsplit(".", 1)[-1] for m in pairs}, name)
    return set(pairs)


def _pairs(header: dict[str, TensorInfo], name: str) -> dict[str, dict[str, TensorInfo]]:
    """module -> {"A": its lora_A, "B": its lora_B} (as found: a half may be missing)."""
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in header.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise UnsupportedAdapter(
                f"adapter {name!r}: unexpected tensor {key!r} (only LoRA A/B weights of "
                "linear layers are served)",
                adapter=name,
            )
        if info.dtype not in _FLOAT_DTYPES:
            raise MalformedAdapter(
                f"adapter {name!r}: tensor {key!r} has dtype {info.dtype}, expected a float",
                adapter=name,
            )
        pairs.setdefault(match["module"], {})[match["ab"]] = info
    if not pairs:
        raise MalformedAdapter(f"adapter {name!r}: {WEIGHTS_FILE} holds no tensors", adapter=name)
    return pairs


def _check_pair(
    module: str, ab: dict[str, TensorInfo], rank: int, base: BaseModelShapes, name: str
) -> None:
    kind = module.rsplit(".", 1)[-1]
    if kind in _UNSERVED_MODULES:
        raise UnsupportedAdapter(f"adapter {name!r}: LoRA on {kind} is not supported", adapter=name)
    if set(ab) != {"A", "B"}:
        raise MalformedAdapter(
            f"adapter {name!r}: {module} has lora_{next(iter(ab))} without its pair",
            adapter=name,
        )
    if module not in base.linear:
        raise IncompatibleAdapter(
            f"adapter {name!r}: module {module} does not exist in base model "
            f"{base.name!r}; the adapter was made for a different base",
            adapter=name,
        )
    out_f, in_f = base.linear[module]
    want_a, want_b = (rank, in_f), (out_f, rank)
    got_a, got_b = ab["A"].shape, ab["B"].shape
    if got_a != want_a or got_b != want_b:
        raise IncompatibleAdapter(
            f"adapter {name!r}: {module} has lora_A {list(got_a)} / lora_B {list(got_b)}, "
            f"base model {base.name!r} with r={rank} needs {list(want_a)} / {list(want_b)} "
            "(made for a different base model?)",
            adapter=name,
        )


def _check_targets(declared: Iterable[str], present: set[str], name: str) -> None:
    # PEFT saves explicit names (it expands "all-linear"), so a declared list that
    # misses a module the tensors cover means the config and the weights disagree.
    declared_kinds = {t.rsplit(".", 1)[-1] for t in declared}
    stray = present - declared_kinds
    if stray:
        raise MalformedAdapter(
            f"adapter {name!r}: tensors for {sorted(stray)} but target_modules is "
            f"{sorted(declared_kinds)}",
            adapter=name,
        )


def _scan_weights(path: Path, header: dict[str, TensorInfo], name: str) -> None:
    """Refuse NaN, infinities and absurd magnitudes, naming the first tensor holding one.

    Reads one block of one tensor at a time: memory stays ~4 MiB whatever the file size.
    The header check has already proven every tensor lies inside the file.
    """
    with path.open("rb") as f:
        for key, info in sorted(header.items(), key=lambda kv: kv[1].offset):
            dtype = _NUMPY_DTYPES[info.dtype]
            remaining = math.prod(info.shape)
            f.seek(info.offset)
            while remaining:
                count = min(remaining, _SCAN_BLOCK)
                block = f.read(count * dtype.itemsize)
                if len(block) != count * dtype.itemsize:  # shrunk since the header check
                    raise MalformedAdapter(
                        f"adapter {name!r}: {WEIGHTS_FILE} is truncated in tensor {key!r}",
                        adapter=name,
                    )
                raw = np.frombuffer(block, dtype=dtype)
                remaining -= count
                values = (
                    (raw.astype(np.uint32) << 16).view(np.float32) if info.dtype == "BF16" else raw
                )
                if not np.isfinite(values).all():
                    raise MalformedAdapter(
                        f"adapter {name!r}: tensor {key!r} holds NaN or infinite values",
                        adapter=name,
                    )
                if values.size and float(np.abs(values).max()) > MAX_ABS_WEIGHT:
                    raise MalformedAdapter(
                        f"adapter {name!r}: tensor {key!r} holds values above "
                        f"{MAX_ABS_WEIGHT:g} in magnitude",
                        adapter=name,
                    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
