"""Read and check a safetensors header without loading any tensor.

The format is: 8 bytes little-endian header length N, N bytes of JSON, then the raw
tensor bytes. Checking that the offsets tile the data region exactly catches truncated
and padded files before anything reaches the engine.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_registry.errors import MalformedAdapter

# An adapter's header is a few KB (~150 bytes per tensor); the safetensors library allows
# 100 MB, which lets one hostile file cost gigabytes of parsed JSON (review M5).
_MAX_HEADER_BYTES = 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Return name -> TensorInfo for every tensor in `path`, or raise MalformedAdapter."""
    name = path.name
    raw, data_start, size = _read_raw(path)
    header = _parse(raw, name)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        tensors[key], begin, end = _tensor(info, data_start, f"{name}: tensor {key!r}")
        spans.append((begin, end, key))
    _check_tiling(spans, size - data_start, name)
    return tensors


def _read_raw(path: Path) -> tuple[bytes, int, int]:
    """The header's bytes, where the data region begins, and the file's size."""
    name = path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MalformedAdapter(f"{name}: file too short to be safetensors")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES:
                raise MalformedAdapter(
                    f"{name}: header of {n} bytes is above the cap of {_MAX_HEADER_BYTES}"
                )
            if n > size - 8:
                raise MalformedAdapter(f"{name}: header length {n} exceeds the file")
            return f.read(n), 8 + n, size
    except OSError as exc:
        raise MalformedAdapter(f"{name}: cannot read: {exc.strerror}") from exc


def _parse(raw: bytes, name: str) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedAdapter(f"{name}: header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise MalformedAdapter(f"{name}: header is not a JSON object")
    return header


def _tensor(info: Any, data_start: int, what: str) -> tuple[TensorInfo, int, int]:
    """One header entry, checked, and where its bytes begin and end in the data region."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedAdapter(f"{what} has a malformed entry") from exc
    if (
        not isinstance(dtype, str)
        or dtype not in _DTYPE_BYTES
        or not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not all(isinstance(o, int) and o >= 0 for o in (begin, end))
    ):
        raise MalformedAdapter(f"{what} has bad dtype, shape or offsets")
    if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise MalformedAdapter(f"{what} size disagrees with its shape")
    return TensorInfo(dtype=dtype, shape=tuple(shape), offset=data_start + begin), begin, end


def _check_tiling(spans: list[tuple[int, int, str]], data_len: int, name: str) -> None:
    """The spans must tile [0, data_len) with no gap, overlap or overrun."""
    cursor = 0
    for begin, end, key in sorted(spans):
        if begin != cursor:
            raise MalformedAdapter(f"{name}: tensor {key!r} overlaps or leaves a gap")
        cursor = end
    if cursor > data_len:
        raise MalformedAdapter(
            f"{name}: truncated: header describes {cursor} data bytes, file has {data_len}"
        )
    if cursor < data_len:
        raise MalformedAdapter(f"{name}: {data_len - cursor} trailing bytes after the tensors")
