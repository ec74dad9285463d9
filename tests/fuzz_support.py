"""Values that steer the API fuzzer (tests/unit/test_fuzz.py) past request validation.

Schemathesis generates requests from the OpenAPI schema alone, so it rarely names an
adapter that exists, and never crafts an almost-valid adapter upload. These pools do: the
seeded registry's names, near misses, and edge values (2**63, NUL bytes, bad URLs,
non-finite floats, malformed or hostile safetensors and adapter_config.json files).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = "tiny"
ADAPTERS = ["pirate", "formal", "casual", BASE]
ALIASES = ["ab"]
TENANTS = ["acme"]
MODELS = [BASE, f"{BASE}:pirate", "pirate", "formal", f"{BASE}:casual", "ab", f"{BASE}:ab"]
BIG = [2**31, 2**63, 2**64, -(2**63) - 1]  # past int32, past SQLite's INTEGER (int64)
TEXT_PART = {"type": "text", "text": "x"}
DEEP = 3000  # JSON nesting deeper than Python's recursion limit (1000)


def safetensors(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, header JSON, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _tensor(**entry: Any) -> bytes:
    return safetensors(
        {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], **entry}}, b"\0" * 4
    )


def adapter_configs(good: dict[str, Any]) -> list[bytes]:
    """Broken or hostile variants of a good adapter_config.json."""

    def with_(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    alpha = f'"lora_alpha": {good["lora_alpha"]}'.encode()
    return [
        with_(r=2**63),
        with_(r=True),
        with_(r=4),  # disagrees with the tensors
        with_(target_modules="q_proj|v_proj"),
        with_(target_modules=[1]),
        with_(target_modules=["k_proj"]),
        with_(peft_type=["LORA"]),
        with_(bias=["none"]),
        # json.loads accepts these spellings; JSON itself has no non-finite numbers.
        with_().replace(alpha, b'"lora_alpha": Infinity'),
        with_().replace(alpha, b'"lora_alpha": NaN'),
        b"[" * DEEP + b"]" * DEEP,
        b"[]",
        b"\xff\xfe{}",
        b"",
    ]


def adapter_models(good: bytes) -> list[bytes]:
    """Malformed variants of a good adapter_model.safetensors."""
    (n,) = struct.unpack("<Q", good[:8])
    return [
        good[:-4],  # truncated
        good + b"\0",  # trailing bytes
        struct.pack("<Q", 2**64 - 1) + good[8:],  # header length past the file
        good[:8],  # a header length and nothing else
        safetensors(b"[" * DEEP + b"]" * DEEP),
        safetensors(b"not json"),
        safetensors(b"[]"),
        _tensor(dtype=["F32"]),
        _tensor(dtype="F128"),
        _tensor(shape=5),
        _tensor(shape=[-1]),
        _tensor(shape=["1"]),
        _tensor(data_offsets=["0", "4"]),
        _tensor(data_offsets=[0]),
        _tensor(data_offsets=[4, 0]),
        safetensors({"t": [1, 2]}, b"\0" * 4),
        safetensors({"__metadata__": {"format": "pt"}}),
        good[: 8 + n] + b"\0" * (len(good) - 8 - n),  # a valid header, zeroed tensors
    ]


FRESH = "<fresh>"  # stands for an adapter name never used before (see `Pools`)


@dataclass(frozen=True)
class Pools:
    """By top-level body (or multipart form) field: values that pass validation and name
    what exists (the first one the plainest), and edge values meant to break something.

    FRESH in `valid["name"]` stands for a new adapter name: the caller makes one up (a
    taken name is refused before an upload's files are even read).
    """

    valid: dict[str, list[Any]]
    edge: dict[str, list[Any]]


def pools(root: Path, key_ids: list[str]) -> Pools:
    allowed = root / "allowed"
    good = allowed / "pirate-1"
    config = json.loads((good / "adapter_config.json").read_text())
    weights = (good / "adapter_model.safetensors").read_bytes()
    valid: dict[str, list[Any]] = {
        "name": [FRESH],
        "model": MODELS,
        "messages": [
            [{"role": "user", "content": "hi"}],
            [{"role": "system", "content": ""}, {"role": "user", "content": [TEXT_PART]}],
        ],
        "prompt": ["hi", [104, 105], ["hi"]],
        "max_tokens": [8, 1, 16, None],
        "max_completion_tokens": [None, 1, 8],
        "n": [1, 2],
        "temperature": [None, 0, 1.0],
        "top_p": [None, 1.0],
        "stop": [None, "ok", ["o", "k"]],
        "stream": [False, True],
        "stream_options": [None, {"include_usage": True}],
        "logprobs": [0, 1],  # chat: a bool, completions: an int
        "top_logprobs": [None, 0],
        "echo": [False],
        "suffix": [None],
        "seed": [None, 0],
        "user": [None, "u1"],
        "return_token_ids": [False, True],
        "source": [str(good), str(allowed / "formal-3")],
        "owner": [None, "acme"],
        "shared": [True, False],
        "variants": [{"pirate": 1}, {"pirate@2": 3, "formal": 1}],
        "version": [1, 2],
        "pinned": [True, False],
        "make_current": [True, False],
        "max_concurrent": [None, 1, 100],
        "tokens_per_minute": [None, 1, 10**6],
        "sha256": [None],
        "key_id": key_ids,
        "adapter_config": [json.dumps(config).encode()],
        "adapter_model": [weights],
    }
    edge: dict[str, list[Any]] = {
        "name": ["pirate", "ab", "Bad Name", "nul\x00", "x" * 65],
        "model": ["nope", f"{BASE}:nope", "", f"{BASE}:", ":pirate", "pirate@1", "acme"],
        "messages": [
            [{"role": "assistant", "content": None}],
            [{"role": "user", "content": "x" * 300}],  # past the fake engine's context
        ],
        "prompt": ["", [2**63], [-1], [0] * 300, "x" * 300],
        "max_tokens": [255, 256, 4096, *BIG],
        "max_completion_tokens": [4097, *BIG],
        "n": [16],
        "stop": ["", [""], ["a", "b", "c", "d"]],
        "logprobs": [2, 20, True],
        "top_logprobs": [2, 20],
        "echo": [True],
        "suffix": ["!"],
        "seed": BIG,
        "user": ["", "\x00"],
        "source": [
            str(allowed / "missing"),
            str(allowed),
            str(allowed / "nul\x00byte"),
            str(root / "outside" / "evil"),
            str(allowed / ".." / "outside" / "evil"),
            "http://127.0.0.1:9/adapter",
            "https://[::1/x",
            "http://",
            "file:///etc/passwd",
        ],
        "owner": ["nope", ""],
        "variants": [
            {"nope@1": 1},
            {"ab": 1},
            {"pirate": 0},
            {"pirate": 2**63},
            {f"pirate@{2**64}": 1},
            {"pirate@0": 1},
            {"pirate@x": 1},
            {},
        ],
        "version": [0, 3, *BIG],
        "max_concurrent": BIG,
        "tokens_per_minute": BIG,
        "sha256": ["0" * 64, "abc", "A" * 64],
        "key_id": ["nope", ""],
        "adapter_config": adapter_configs(config),
        "adapter_model": adapter_models(weights),
    }
    return Pools(valid=valid, edge=edge)


def path_pools(path: str, key_ids: list[str]) -> Pools:
    """Path parameters of `path`: what the seeded registry holds, and edge values."""
    by_prefix = {"/admin/aliases": ("ab", ALIASES), "/admin/tenants": ("acme", TENANTS)}
    first, names = next(
        (v for k, v in by_prefix.items() if path.startswith(k)), ("pirate", ADAPTERS)
    )
    valid: dict[str, list[Any]] = {
        "name": [first, *names],
        "version": [1, 2],
        "key_id": key_ids,
        "response_id": ["chatcmpl-nope"],  # GET /v1/exposures/{response_id}
    }
    edge: dict[str, list[Any]] = {
        "name": ["nope", "Bad Name", "x" * 65],
        "version": [0, 3, *BIG],
        "key_id": ["nope"],
        "response_id": ["Bad Id", "x" * 300, "resp_\u00e9"],
    }
    keep = [k for k in valid if f"{{{k}}}" in path]
    return Pools(valid={k: valid[k] for k in keep}, edge={k: edge[k] for k in keep})
