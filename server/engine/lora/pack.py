"""Each adapter's weights per LoRA layer, copied out of vLLM's slots once per adapter.

vLLM keeps each layer's LoRA weights as per-slice stacked tensors ``[slots, 1, rank,
in]`` / ``[slots, 1, out, rank]``, padded to ``max_lora_rank``, zero for modules an
adapter does not target, and rewrites a slot whenever another adapter takes it. With
per-customer adapters (nearly every request names another one) slots change hands every
few steps, so what the fast path derives is keyed by adapter, not by slot: the first time
an adapter is seen in a slot, each layer copies out its weights in compact form
(`AdapterLayer`: ranks trimmed to what the adapter uses, untargeted slices dropped, B
pre-cast to fp32), and keeps them while the adapter stays in use. Moving an adapter to
another slot, or back into one after an eviction, then costs nothing, and a slot change
costs only the new adapter's copy instead of repacking every slot of every layer.

A `LayerPack` is one layer's view of the current slot layout: per slot, its adapter's
`AdapterLayer`. For rows of several adapters interleaved (batched decode), adapters
whose padded shapes agree (`AdapterLayer.sig`) are stacked into a `SlotClass`, once per
set of adapters present (the set of a decode batch holds for several steps), and each
class runs as one batched GEMM pair (server/engine/lora/apply.py).

Pure functions over tensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final

import torch

from server.engine.lora.kernels import stacked_3d

__all__ = [
    "AdapterLayer",
    "LayerPack",
    "SlotAlone",
    "SlotClass",
    "adapter_layer",
    "build_pack",
    "versions",
]

# At decode sizes (a few rows per adapter) these GEMMs are bound by reading the adapter
# weights and by per-call overhead, not by arithmetic. The cost model below counts both
# in bytes: one more torch call costs about as much as reading this many bytes of weights
# (~10 us at ~15 GB/s on this class of CPU).
_OP_BYTES: Final = 150_000
# Member sets whose stacked classes a pack keeps (a decode batch's set holds for several
# steps; a few recent ones cover requests joining and leaving).
_STACKS_KEPT: Final = 4


@dataclass(frozen=True)
class SlotAlone:
    """One adapter's weights for rows computed on their own (single-stream decode, prefill).

    In fp32: at a few rows a bf16 GEMM call costs ~30 us here against ~8 us in fp32
    (oneDNN's bf16 set-up), while reading the weights costs about the same either way
    (bandwidth bound).
    a: [in, sum(sig)]; expands: (col0, col1, out0, out1, B^T) per GEMM: one
    block-diagonal GEMM over all its slices, or one per slice, as `AdapterLayer`'s B.
    """

    a: torch.Tensor
    expands: tuple[tuple[int, int, int, int, torch.Tensor], ...]


@dataclass(frozen=True)
class AdapterLayer:
    """One adapter's weights in one LoRA layer, in the layout a batched GEMM pair wants.

    ranks: per output slice, the rank the adapter uses (0: slice not targeted);
    sig: those ranks rounded up to a power of two: adapters with equal sig stack into one
        class (padding a rank 4 to 8 reads a little more; one class per distinct rank
        would cost a GEMM pair each);
    a: [in, sum(sig)] in fp32, slice i's A^T at columns ``cols[i]``, zero
        beyond its rank;
    b: per used slice, [sig_i, out_i] in fp32; or, when one GEMM over a block-diagonal
        weight reads less than one GEMM per slice costs, ``block``: [sum(sig), span];
    outs: per used slice, its output columns; span = (first, last) output column.
    """

    ranks: tuple[int, ...]
    sig: tuple[int, ...]
    a: torch.Tensor
    b: tuple[torch.Tensor, ...]
    block: torch.Tensor | None
    cols: tuple[tuple[int, int], ...]
    outs: tuple[tuple[int, int], ...]
    span: tuple[int, int]
    _alone: list[SlotAlone] = field(default_factory=list, compare=False)

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    @property
    def parts(self) -> tuple[tuple[int, int, int, int], ...]:
        """Per used slice (col0, col1, out0, out1) in the compact (exact-rank) layout."""
        parts: list[tuple[int, int, int, int]] = []
        col = 0
        for r, (o0, o1) in zip((r for r in self.ranks if r), self.outs, strict=True):
            parts.append((col, col + r, o0, o1))
            col += r
        return tuple(parts)

    def alone(self) -> SlotAlone:
        """The layout for rows done run by run (made on first use)."""
        if not self._alone:
            self._alone.append(_alone(self))
        return self._alone[0]


@dataclass(frozen=True)
class SlotClass:
    """Adapters (by slot) computed together with one batched GEMM pair: their stacked
    `AdapterLayer` weights. slots: member slots, ascending; ranks: their common sig;
    a: [members, in, sum(ranks)]; b: per used slice [members, r_i, out_i], or
    block: [members, R, span]; cols / outs / span as `AdapterLayer`'s."""

    slots: tuple[int, ...]
    ranks: tuple[int, ...]
    a: torch.Tensor
    b: tuple[torch.Tensor, ...]
    block: torch.Tensor | None
    cols: tuple[tuple[int, int], ...]
    outs: tuple[tuple[int, int], ...]
    span: tuple[int, int]


@dataclass(frozen=True)
class LayerPack:
    """One LoRA layer's adapters for one slot layout.

    layout: per slot, the key of the adapter in it (vLLM's adapter id, or a stand-in when
        the ids are unknown) or None; the pack is valid while the layout is the same.
    adapters: per slot, its adapter's weights here (None: empty slot, or an adapter with
        no weights in this layer).
    """

    layout: tuple[Hashable | None, ...]
    adapters: tuple[AdapterLayer | None, ...]
    _stacks: dict[tuple[int, ...], tuple[SlotClass, ...]] = field(
        default_factory=dict, compare=False
    )

    @property
    def rank(self) -> tuple[int, ...]:
        return tuple(0 if w is None else w.rank for w in self.adapters)

    @property
    def has_weights(self) -> tuple[bool, ...]:
        return tuple(w is not None for w in self.adapters)

    @property
    def any_weights(self) -> bool:
        return any(w is not None for w in self.adapters)

    @property
    def parts(self) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
        return tuple(() if w is None else w.parts for w in self.adapters)

    def alone(self, slot: int) -> SlotAlone | None:
        if slot >= len(self.adapters):
            return None
        weights = self.adapters[slot]
        return None if weights is None else weights.alone()

    @property
    def classes(self) -> tuple[SlotClass, ...]:
        """The classes of every slot with weights here."""
        return self.classes_for(tuple(s for s, w in enumerate(self.adapters) if w is not None))

    def classes_for(self, slots: tuple[int, ...]) -> tuple[SlotClass, ...]:
        """The classes of these slots (ascending; those without weights here are left out),
        stacked on first use and kept for the next steps with the same set."""
        found = self._stacks.get(slots)
        if found is None:
            if len(self._stacks) >= _STACKS_KEPT:
                self._stacks.pop(next(iter(self._stacks)))
            found = self._stacks[slots] = _stack_classes(self.adapters, slots)
        return found


def versions(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The tensors' version counters: they move with every in-place write."""
    return tuple(t._version for t in tensors)


def build_pack(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    output_slices: Sequence[int],
    layout: Sequence[Hashable | None] | None = None,
    known: dict[Hashable, AdapterLayer | None] | None = None,
) -> LayerPack:
    """The pack of a layer's per-slice stacked weights ([slots,1,r,in] / [slots,1,out,r]).

    layout: per slot, the key of its adapter (None: empty); default: every slot keyed by
        its position and the tensors' versions (any write makes every slot new).
    known: adapter key -> weights already copied out (updated with the new ones).
    """
    a3 = [stacked_3d(t) for t in lora_a]  # [slots, r, in]
    b3 = [stacked_3d(t) for t in lora_b]  # [slots, out, r]
    for bi, out_w in zip(b3, output_slices, strict=True):
        if bi.shape[1] < out_w:
            raise ValueError(f"LoRA B of {bi.shape[1]} rows for an output slice of {out_w}")
    slots = a3[0].shape[0]
    if layout is None:
        stamp = versions([*lora_a, *lora_b])
        layout = [(stamp, s) for s in range(slots)]
    if len(layout) > slots:
        raise ValueError(f"a layout of {len(layout)} slots for {slots} stacked slots")
    cache: dict[Hashable, AdapterLayer | None] = {} if known is None else known
    adapters: list[AdapterLayer | None] = []
    for slot, key in enumerate(layout):
        if key is None:
            adapters.append(None)
            continue
        if key not in cache:
            cache[key] = adapter_layer(a3, b3, output_slices, slot)
        adapters.append(cache[key])
    adapters += [None] * (slots - len(layout))
    return LayerPack(tuple(layout), tuple(adapters))


# --------------------------------------------------------------------------- one adapter


def adapter_layer(
    a3: Sequence[torch.Tensor],
    b3: Sequence[torch.Tensor],
    output_slices: Sequence[int],
    slot: int,
) -> AdapterLayer | None:
    """Copy one slot's weights out of a layer's stacked [slots, r, in] / [slots, out, r]
    tensors (None: the adapter in it has no weights in this layer)."""
    ranks = tuple(_used_rank(a[slot]) for a in a3)
    if not any(ranks):
        return None
    sig = tuple(_padded(r, a.shape[1]) for r, a in zip(ranks, a3, strict=True))
    # fp32 for every GEMM of ours: at a few rows per adapter, oneDNN's bf16 (batched) GEMM
    # costs 2.5-6x its fp32 one here (e.g. 16 adapters x 1 row x [576, 24]: 67 vs 25 us,
    # measured under the per-customer load, where the bf16 shrink alone took 17% of the
    # worker), and one fp32 copy serves both the stacked classes and rows done alone.
    depth = a3[0].shape[2]
    a = torch.zeros(depth, sum(sig), dtype=torch.float32)
    b: list[torch.Tensor] = []
    cols: list[tuple[int, int]] = []
    outs: list[tuple[int, int]] = []
    col = off = 0
    for i, (r, padded, out_w) in enumerate(zip(ranks, sig, output_slices, strict=True)):
        if r:
            a[:, col : col + r] = a3[i][slot, :r, :].t()
            bi = torch.zeros(padded, out_w, dtype=torch.float32)
            bi[:r] = b3[i][slot, :out_w, :r].t()
            b.append(bi)
            cols.append((col, col + padded))
            outs.append((off, off + out_w))
            col += padded
        off += out_w
    span = (outs[0][0], outs[-1][1])
    block: torch.Tensor | None = None
    if _block_is_cheaper(sig, outs, span):
        block = torch.zeros(col, span[1] - span[0], dtype=torch.float32)
        for (c0, c1), (o0, o1), bi in zip(cols, outs, b, strict=True):
            block[c0:c1, o0 - span[0] : o1 - span[0]] = bi
        b = []
    return AdapterLayer(ranks, sig, a, tuple(b), block, tuple(cols), tuple(outs), span)


def _used_rank(a: torch.Tensor) -> int:
    """For one slot's ``[r, in]`` A: 1 + its last nonzero rank row (0: all zero)."""
    nonzero = torch.nonzero(a.abs().amax(dim=1))
    return int(nonzero[-1, 0]) + 1 if nonzero.numel() else 0


def _padded(rank: int, at_most: int) -> int:
    if rank == 0:
        return 0
    return min(1 << (rank - 1).bit_length(), at_most)


def _block_is_cheaper(
    sig: Sequence[int], outs: Sequence[tuple[int, int]], span: tuple[int, int]
) -> bool:
    """One GEMM over a block-diagonal B vs one per used slice, in bytes-equivalent."""
    used = [r for r in sig if r]
    if len(used) < 2:
        return False
    block = sum(used) * (span[1] - span[0]) * 4
    split = sum(r * (o1 - o0) for r, (o0, o1) in zip(used, outs, strict=True)) * 4
    return block < split + _OP_BYTES * (len(used) - 1)


def _alone(w: AdapterLayer) -> SlotAlone:
    """The layout for rows done run by run: the same fp32 tensors the classes stack (no
    second copy); columns padded like `sig`, which adds zeros only."""
    a = w.a
    if w.block is not None:
        return SlotAlone(a, ((0, a.shape[1], w.span[0], w.span[1], w.block),))
    return SlotAlone(
        a,
        tuple(
            (c0, c1, o0, o1, b) for (c0, c1), (o0, o1), b in zip(w.cols, w.outs, w.b, strict=True)
        ),
    )


# --------------------------------------------------------------------------- classes


def _stack_classes(
    adapters: Sequence[AdapterLayer | None], slots: tuple[int, ...]
) -> tuple[SlotClass, ...]:
    by_sig: dict[tuple[int, ...], list[tuple[int, AdapterLayer]]] = {}
    for slot in slots:
        w = adapters[slot] if slot < len(adapters) else None
        if w is not None:
            by_sig.setdefault(w.sig, []).append((slot, w))
    classes: list[SlotClass] = []
    for sig, members in sorted(by_sig.items(), key=lambda item: item[1][0][0]):
        ws = [w for _, w in members]
        first = ws[0]
        block: torch.Tensor | None = None
        b: tuple[torch.Tensor, ...] = ()
        if first.block is not None:
            block = torch.stack([w.block for w in ws if w.block is not None])
        else:
            b = tuple(torch.stack([w.b[k] for w in ws]) for k in range(len(first.b)))
        classes.append(
            SlotClass(
                tuple(s for s, _ in members),
                sig,
                torch.stack([w.a for w in ws]),
                b,
                block,
                first.cols,
                first.outs,
                first.span,
            )
        )
    return tuple(classes)
