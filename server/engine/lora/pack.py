"""One pack per LoRA layer: its slot weights fused across slices, rebuilt only when vLLM
writes them.

vLLM keeps each layer's LoRA weights as per-slice stacked tensors ``[slots, 1, rank,
in]`` / ``[slots, 1, out, rank]``, padded to ``max_lora_rank`` and zero for modules an
adapter does not target. The pack fuses the slices (A of q/k/v side by side: one shrink
GEMM; B block-diagonal: one expand GEMM), trims the rank to what the loaded adapters
actually use, drops slices no loaded adapter targets, and holds A pre-cast to fp32.
Tensor version counters (bumped by every in-place write, which is how vLLM loads and
evicts slot weights) tell when a pack is stale: no hook into vLLM's loader is needed.
Pure functions over tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import torch

from server.engine.lora.kernels import stacked_3d

__all__ = ["LayerPack", "SlotAlone", "SlotClass", "build_pack", "versions"]

# At decode sizes (a few rows per adapter) these GEMMs are bound by reading the adapter
# weights and by per-call overhead, not by arithmetic. The cost model below counts both
# in bytes: one more torch call costs about as much as reading this many bytes of weights
# (~10 us at ~15 GB/s on this class of CPU).
_OP_BYTES: Final = 150_000
# torch calls per slot class and layer call: gather, shrink, expand, pick rows.
_CALLS_PER_CLASS: Final = 4


@dataclass(frozen=True)
class SlotClass:
    """Slots computed together with one batched GEMM pair (their weights padded alike).

    slots: member slots, ascending; ranks: per output slice, the widest rank any member
    uses (0: no member uses the slice);
    a: [members, in, sum(ranks)], slice i's A^T at columns ``cols[i]``;
    b: per used slice, [members, rank_i, out_i]; or, when one GEMM over a block-diagonal
       weight reads less than one GEMM per slice costs, ``block``: [members, R, span];
    outs: per used slice, its output columns; span = (first, last) output column.
    """

    slots: tuple[int, ...]
    ranks: tuple[int, ...]
    a: torch.Tensor
    b: tuple[torch.Tensor, ...]
    block: torch.Tensor | None
    cols: tuple[tuple[int, int], ...]
    outs: tuple[tuple[int, int], ...]
    span: tuple[int, int]


@dataclass(frozen=True)
class SlotAlone:
    """One slot's weights for rows computed on their own (single-stream decode, prefill).

    Only the rank rows the adapter uses, slice after slice, in fp32: at a few rows a bf16
    GEMM call costs ~30 us here against ~8 us in fp32 (oneDNN's bf16 set-up), while
    reading the weights costs about the same either way (bandwidth bound).
    a: [in, rank]; expands: (col0, col1, out0, out1, B^T) per GEMM: one block-diagonal
    GEMM over all its slices, or one per slice, whichever the cost model prefers.
    """

    a: torch.Tensor
    expands: tuple[tuple[int, int, int, int, torch.Tensor], ...]


@dataclass(frozen=True)
class LayerPack:
    """One LoRA layer's slot weights, fused across slices, for the current slot contents.

    rank / parts: per slot, its used rank over all slices and, per slice it uses,
        (col0, col1, out0, out1); 0 / () when the slot has no weights in this layer.
    alone(slot): the compact layout for that slot's rows done run by run (None: no
        weights here).
    classes: for gathered batches (several adapters interleaved), slots with the same
        per-slice ranks form a class, and classes are merged while the padding a merge
        adds costs less than the calls it saves, so the weights read stay close to what
        the adapters really have (vLLM pads every slot to max_lora_rank and to every
        slice).
    A pack is replaced whenever vLLM writes slot weights, which can happen every few
    steps when more adapters are in demand than there are slots: so both layouts are
    built on first use, and only the parts a step needs (measured: building everything
    for the 120 LoRA layers of the demo model took 254 ms, blocking that step).
    """

    versions: tuple[int, ...]
    rank: tuple[int, ...]
    parts: tuple[tuple[tuple[int, int, int, int], ...], ...]
    width: int
    a3: tuple[torch.Tensor, ...]
    b3: tuple[torch.Tensor, ...]
    used: tuple[tuple[int, ...], ...]
    slices: tuple[int, ...]
    _alone: dict[int, SlotAlone] = field(default_factory=dict)
    _classes: list[tuple[SlotClass, ...]] = field(default_factory=list)

    @property
    def has_weights(self) -> tuple[bool, ...]:
        return tuple(r > 0 for r in self.rank)

    def alone(self, slot: int) -> SlotAlone | None:
        if slot >= len(self.rank) or not self.rank[slot]:
            return None
        if slot not in self._alone:
            self._alone[slot] = _slot_alone(self, slot)
        return self._alone[slot]

    @property
    def classes(self) -> tuple[SlotClass, ...]:
        if not self._classes:
            depth = self.a3[0].shape[2]
            signatures = {
                s: tuple(u[s] for u in self.used) for s in range(len(self.rank)) if self.rank[s]
            }
            self._classes.append(
                tuple(
                    _build_class(members, ranks, self.a3, self.b3, self.slices)
                    for members, ranks in _choose_classes(signatures, depth, self.slices)
                )
            )
        return self._classes[0]


def versions(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The tensors' version counters: they move with every in-place write."""
    return tuple(t._version for t in tensors)


def build_pack(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    output_slices: Sequence[int],
) -> LayerPack:
    """Fuse a layer's per-slice stacked weights ([slots,1,r,in] / [slots,1,out,r])."""
    stamp = versions([*lora_a, *lora_b])
    a3 = [stacked_3d(t) for t in lora_a]  # [slots, r, in]
    b3 = [stacked_3d(t) for t in lora_b]  # [slots, out, r]
    for bi, out_w in zip(b3, output_slices, strict=True):
        if bi.shape[1] < out_w:
            raise ValueError(f"LoRA B of {bi.shape[1]} rows for an output slice of {out_w}")
    slots = a3[0].shape[0]
    used = [_used_ranks(a) for a in a3]  # [slice][slot]
    rank = tuple(sum(u[s] for u in used) for s in range(slots))
    width = sum(output_slices)
    parts: list[tuple[tuple[int, int, int, int], ...]] = []
    for s in range(slots):
        col = off = 0
        mine: list[tuple[int, int, int, int]] = []
        for i, out_w in enumerate(output_slices):
            r = used[i][s]
            if r:
                mine.append((col, col + r, off, off + out_w))
                col += r
            off += out_w
        parts.append(tuple(mine))
    return LayerPack(
        stamp,
        rank,
        tuple(parts),
        width,
        tuple(a3),
        tuple(b3),
        tuple(tuple(u) for u in used),
        tuple(output_slices),
    )


def _used_ranks(a: torch.Tensor) -> list[int]:
    """Per slot of ``[slots, r, in]``: 1 + its last nonzero rank row (0: all zero)."""
    nonzero = a.abs().amax(dim=2) > 0  # [slots, r]
    positions = torch.arange(1, a.shape[1] + 1).expand_as(nonzero)
    used: list[int] = (nonzero * positions).amax(dim=1).tolist()
    return used


# --------------------------------------------------------------------------- classes


def _class_cost(members: int, ranks: Sequence[int], depth: int, outs: Sequence[int]) -> int:
    weights = members * sum(r * (depth + o) for r, o in zip(ranks, outs, strict=True))
    return weights * 2 + _OP_BYTES * _CALLS_PER_CLASS


def _choose_classes(
    signatures: dict[int, tuple[int, ...]], depth: int, outs: Sequence[int]
) -> list[tuple[list[int], tuple[int, ...]]]:
    """Group slots (slot -> per-slice ranks) into classes: exact signatures first, then
    greedy merges of the pair whose merge saves the most (padding vs calls)."""
    by_sig: dict[tuple[int, ...], list[int]] = {}
    for slot, sig in sorted(signatures.items()):
        by_sig.setdefault(sig, []).append(slot)
    classes = [(slots, sig) for sig, slots in by_sig.items()]
    while len(classes) > 1:
        best: tuple[int, int, int] | None = None
        for i in range(len(classes)):
            for j in range(i + 1, len(classes)):
                (si, ri), (sj, rj) = classes[i], classes[j]
                merged = tuple(max(x, y) for x, y in zip(ri, rj, strict=True))
                delta = _class_cost(len(si) + len(sj), merged, depth, outs) - (
                    _class_cost(len(si), ri, depth, outs) + _class_cost(len(sj), rj, depth, outs)
                )
                if best is None or delta < best[0]:
                    best = (delta, i, j)
        assert best is not None
        delta, i, j = best
        if delta >= 0:
            break
        (si, ri), (sj, rj) = classes[i], classes[j]
        merged_class = (sorted(si + sj), tuple(max(x, y) for x, y in zip(ri, rj, strict=True)))
        classes = [c for k, c in enumerate(classes) if k not in (i, j)] + [merged_class]
    return sorted(classes)


def _build_class(
    slots: list[int],
    ranks: tuple[int, ...],
    a3: Sequence[torch.Tensor],
    b3: Sequence[torch.Tensor],
    output_slices: Sequence[int],
) -> SlotClass:
    index = torch.tensor(slots, dtype=torch.long)
    depth, dtype = a3[0].shape[2], a3[0].dtype
    a = torch.zeros(len(slots), depth, sum(ranks), dtype=dtype)
    b: list[torch.Tensor] = []
    cols: list[tuple[int, int]] = []
    outs: list[tuple[int, int]] = []
    col = off = 0
    for i, (r, out_w) in enumerate(zip(ranks, output_slices, strict=True)):
        if r:
            a[:, :, col : col + r] = a3[i].index_select(0, index)[:, :r, :].transpose(1, 2)
            b.append(
                b3[i].index_select(0, index)[:, :out_w, :r].transpose(1, 2).float().contiguous()
            )
            cols.append((col, col + r))
            outs.append((off, off + out_w))
            col += r
        off += out_w
    span = (outs[0][0], outs[-1][1])
    used = [(c1 - c0, o1 - o0) for (c0, c1), (o0, o1) in zip(cols, outs, strict=True)]
    block_bytes = col * (span[1] - span[0]) * 4
    split_bytes = sum(r * o for r, o in used) * 4 + _OP_BYTES * (len(used) - 1)
    block: torch.Tensor | None = None
    if len(used) > 1 and block_bytes < split_bytes:
        block = torch.zeros(len(slots), col, span[1] - span[0], dtype=torch.float32)
        for (c0, c1), (o0, o1), bi in zip(cols, outs, b, strict=True):
            block[:, c0:c1, o0 - span[0] : o1 - span[0]] = bi
    return SlotClass(tuple(slots), ranks, a, tuple(b), block, tuple(cols), tuple(outs), span)


# --------------------------------------------------------------------------- alone


def _per_slice_cost(sizes: Sequence[tuple[int, int]], itemsize: int) -> tuple[int, int]:
    """(block-diagonal cost, per-slice cost) in bytes-equivalent, for (rank, out) slices."""
    total_r = sum(r for r, _ in sizes)
    total_o = sum(o for _, o in sizes)
    block = total_r * total_o * itemsize
    split = sum(r * o for r, o in sizes) * itemsize + _OP_BYTES * (len(sizes) - 1)
    return block, split


def _slot_alone(pack: LayerPack, slot: int) -> SlotAlone:
    parts = pack.parts[slot]
    a_cols: list[torch.Tensor] = []
    b_parts: list[torch.Tensor] = []
    for i, r in enumerate(u[slot] for u in pack.used):
        if r:
            a_cols.append(pack.a3[i][slot, :r, :].t().float())
            b_parts.append(pack.b3[i][slot, : pack.slices[i], :r].t().float())
    a = torch.cat(list(a_cols), dim=1).contiguous()
    sizes = [(c1 - c0, o1 - o0) for c0, c1, o0, o1 in parts]
    block_cost, split_cost = _per_slice_cost(sizes, 4)
    if len(parts) > 1 and split_cost < block_cost:
        return SlotAlone(
            a,
            tuple(
                (c0, c1, o0, o1, b.contiguous())
                for (c0, c1, o0, o1), b in zip(parts, b_parts, strict=True)
            ),
        )
    lo, hi = parts[0][2], parts[-1][3]
    block = torch.zeros(a.shape[1], hi - lo, dtype=torch.float32)
    for (c0, c1, o0, o1), b in zip(parts, b_parts, strict=True):
        block[c0:c1, o0 - lo : o1 - lo] = b
    return SlotAlone(a, ((0, a.shape[1], lo, hi, block),))
