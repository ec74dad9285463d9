"""Fast multi-LoRA linear layers for vLLM's CPU punica wrapper (pure torch).

Why
---
vLLM's ``PunicaWrapperCPU.add_lora_linear`` runs, for every LoRA layer call, one shrink
and one expand op per output slice (q/k/v are three, gate/up two), each of which works
out again which rows use which adapter slot, allocates fp32 buffers, and does one small
matmul per slot. On CPU the matmuls are tiny (rank 8-64) and what the step pays for is
per-call overhead: ~14 op calls per decoder layer, each 30-100 us of Python and oneDNN
set-up, against a base layer that costs about as much. Measured on this box that made 8
adapters run at 0.2-0.3x the base model's throughput.

What this module does instead
-----------------------------
* **One plan per engine step.** The token -> slot mapping changes once per step, not per
  layer: the first LoRA layer call after ``update_metadata`` turns it into a plan (runs
  of rows sharing a slot; for fragmented batches, gather/scatter index tensors) that
  every layer of that step reuses.
* **One pack per layer, rebuilt only when its weights change.** vLLM keeps each layer's
  LoRA weights as per-slice stacked tensors ``[slots, 1, rank, in]`` /
  ``[slots, 1, out, rank]``, padded to ``max_lora_rank`` and zero for modules an adapter
  does not target. The pack fuses the slices (A of q/k/v side by side: one shrink GEMM;
  B block-diagonal: one expand GEMM), trims the rank to what the loaded adapters
  actually use, drops slices no loaded adapter targets, and holds A pre-cast to fp32.
  Tensor version counters (bumped by every in-place write, which is how vLLM loads and
  evicts slot weights) tell when a pack is stale: no hook into vLLM's loader is needed.
* **Few GEMMs per layer call.** One adapter over contiguous rows (single-stream decode,
  prefill chunks): one shrink ``mm`` and one expand ``addmm_`` straight on views of x and
  y. Several adapters interleaved (batched decode): rows are gathered slot by slot into
  a padded ``[slots, rows, in]`` block, then one ``bmm`` shrink, one ``bmm`` expand and
  one ``index_add_`` back: the same handful of calls whatever the number of adapters.
* **Base rows cost nothing**, and a batch without adapters returns at once (upstream
  still allocates and walks its buffers).

Numerics follow upstream: the shrink is computed in fp32 (upstream's buffer dtype), the
expand in the output dtype, added in place into the layer output.

Where it applies
----------------
`install` rebinds ``add_lora_linear`` and ``update_metadata`` on vLLM's
``PunicaWrapperCPU`` class (vLLM 0.32.0 signatures; the rest of the wrapper still calls
the per-op replacements of `server.engine.lora_ops`). It is only ever installed by the
plugin in ``server/engine/vllm.py``, on the CPU platform, with the op fix; GPU builds
never see it. `set_impl` switches between this path, the per-op path and vLLM's own ops
at run time (for side-by-side benchmarks in one engine); ``LORASWAP_LORA_FAST=0`` turns
this path off at start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final, Literal

import torch

from server.engine import lora_ops

__all__ = [
    "Grouped",
    "Impl",
    "LayerPack",
    "StepPlan",
    "add_lora_linear",
    "apply_lora",
    "build_pack",
    "install",
    "plan_step",
    "set_impl",
]

Impl = Literal["fast", "ops", "upstream"]

# A run of rows [start, stop) that all use adapter slot `slot` (>= 0).
_Run = tuple[int, int, int]

# Runs at least this long (prefill chunks) are computed in place, one GEMM pair per run;
# shorter ones (decode rows) are gathered slot by slot when there are several.
_LONG_RUN_ROWS: Final = 32


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Grouped:
    """Rows gathered slot by slot into a padded ``[count, per, in]`` block.

    first / count: the members ``first .. first+count-1`` of a slot class (positions in
    its slot list; a member in that range with no rows here gets padding only); per:
    rows per member; gather: source row of every block
    row (padding repeats a real row: computed, never written back); valid: positions of
    the real rows in the block; dest: their rows in the output.
    """

    first: int
    count: int
    per: int
    gather: torch.Tensor
    valid: torch.Tensor
    dest: torch.Tensor


@dataclass(frozen=True)
class StepPlan:
    """How the rows of one engine step map to adapter slots, for every layer of the step.

    rows: the number of rows (tokens) the mapping covers.
    runs: runs of rows sharing a slot that are computed on their own (one GEMM pair on
        views each): a lone run (single-stream decode) and long runs (prefill chunks).
    scattered: the other adapter runs (decode rows of interleaved adapters), gathered
        slot by slot. Keeping long runs out of the gather matters under continuous
        batching: a 50-row prefill chunk among 1-row decodes would otherwise pad every
        slot of its class to 50 rows.
    Layers group slots differently (an adapter that targets q/v only has no weights in
    the MLP; see `LayerPack`), so the gathered layout is made per slot class, once per
    step, and cached here.
    """

    rows: int
    runs: tuple[_Run, ...]
    scattered: tuple[_Run, ...]
    _grouped: dict[tuple[int, ...], Grouped | None] = field(default_factory=dict)

    @property
    def no_lora(self) -> bool:
        return not self.runs and not self.scattered

    @property
    def by_runs(self) -> bool:
        return not self.scattered

    def grouped(self, members: tuple[int, ...]) -> Grouped | None:
        """The gathered layout of the scattered rows of these slots (None: none here)."""
        if members not in self._grouped:
            self._grouped[members] = _group(self.scattered, members)
        return self._grouped[members]


def plan_step(slots: Sequence[int]) -> StepPlan:
    """The plan for per-row slot indices (negative: no adapter)."""
    runs: list[_Run] = []
    start = 0
    n = len(slots)
    for pos in range(1, n + 1):
        if pos == n or slots[pos] != slots[start]:
            if slots[start] >= 0:
                runs.append((slots[start], start, pos))
            start = pos
    long = [r for r in runs if r[2] - r[1] >= _LONG_RUN_ROWS]
    short = [r for r in runs if r[2] - r[1] < _LONG_RUN_ROWS]
    if len(short) <= 1:  # nothing worth a gather
        return StepPlan(n, tuple(runs), ())
    return StepPlan(n, tuple(long), tuple(short))


def _group(runs: Sequence[_Run], members: tuple[int, ...]) -> Grouped | None:
    position = {slot: i for i, slot in enumerate(members)}
    rows_of: dict[int, list[int]] = {}
    for slot, begin, stop in runs:
        if slot in position:
            rows_of.setdefault(position[slot], []).extend(range(begin, stop))
    if not rows_of:
        return None
    first, last = min(rows_of), max(rows_of)
    per = max(len(r) for r in rows_of.values())
    gather: list[int] = []
    valid: list[int] = []
    dest: list[int] = []
    for member in range(first, last + 1):
        rows = rows_of.get(member, [])
        base = len(gather)
        valid.extend(range(base, base + len(rows)))
        dest.extend(rows)
        gather.extend(rows + [rows[0] if rows else dest[0]] * (per - len(rows)))

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return Grouped(first, last - first + 1, per, as_long(gather), as_long(valid), as_long(dest))


# --------------------------------------------------------------------------- pack

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
    _built: dict[object, Any] = field(default_factory=dict)

    @property
    def has_weights(self) -> tuple[bool, ...]:
        return tuple(r > 0 for r in self.rank)

    def alone(self, slot: int) -> SlotAlone | None:
        if slot >= len(self.rank) or not self.rank[slot]:
            return None
        if slot not in self._built:
            self._built[slot] = _slot_alone(self, slot)
        built: SlotAlone = self._built[slot]
        return built

    @property
    def classes(self) -> tuple[SlotClass, ...]:
        if "classes" not in self._built:
            depth = self.a3[0].shape[2]
            signatures = {
                s: tuple(u[s] for u in self.used) for s in range(len(self.rank)) if self.rank[s]
            }
            self._built["classes"] = tuple(
                _build_class(members, ranks, self.a3, self.b3, self.slices)
                for members, ranks in _choose_classes(signatures, depth, self.slices)
            )
        classes: tuple[SlotClass, ...] = self._built["classes"]
        return classes


def _versions(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


def _used_ranks(a: torch.Tensor) -> list[int]:
    """Per slot of ``[slots, r, in]``: 1 + its last nonzero rank row (0: all zero)."""
    nonzero = a.abs().amax(dim=2) > 0  # [slots, r]
    positions = torch.arange(1, a.shape[1] + 1).expand_as(nonzero)
    used: list[int] = (nonzero * positions).amax(dim=1).tolist()
    return used


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


def build_pack(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    output_slices: Sequence[int],
) -> LayerPack:
    """Fuse a layer's per-slice stacked weights ([slots,1,r,in] / [slots,1,out,r])."""
    versions = _versions([*lora_a, *lora_b])
    a3 = [lora_ops._stacked_3d(t) for t in lora_a]  # [slots, r, in]
    b3 = [lora_ops._stacked_3d(t) for t in lora_b]  # [slots, out, r]
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
        versions,
        rank,
        tuple(parts),
        width,
        tuple(a3),
        tuple(b3),
        tuple(tuple(u) for u in used),
        tuple(output_slices),
    )


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


# --------------------------------------------------------------------------- compute


def _per_slice_cost(sizes: Sequence[tuple[int, int]], itemsize: int) -> tuple[int, int]:
    """(block-diagonal cost, per-slice cost) in bytes-equivalent, for (rank, out) slices."""
    total_r = sum(r for r, _ in sizes)
    total_o = sum(o for _, o in sizes)
    block = total_r * total_o * itemsize
    split = sum(r * o for r, o in sizes) * itemsize + _OP_BYTES * (len(sizes) - 1)
    return block, split


def apply_lora(
    y: torch.Tensor, x: torch.Tensor, pack: LayerPack, plan: StepPlan, scale: float
) -> None:
    """``y[t] += scale * x[t] @ A[slot(t)] @ B[slot(t)]`` for every adapter row t."""
    if plan.no_lora or not any(pack.rank):
        return
    if plan.runs:
        xf = x if x.dtype == torch.float32 else x.float()
        for slot, start, stop in plan.runs:
            alone = pack.alone(slot)
            if alone is None:
                continue
            whole = start == 0 and stop == plan.rows
            h = torch.mm(xf if whole else xf[start:stop], alone.a)
            if scale != 1.0:
                h.mul_(scale)
            rows = y if whole else y[start:stop]
            for c0, c1, o0, o1, b in alone.expands:
                part = h if c0 == 0 and c1 == h.shape[1] else h[:, c0:c1]
                rows[:, o0:o1].add_(torch.mm(part, b))  # fp32 into the layer dtype
    if not plan.scattered:
        return
    dtype = pack.classes[0].a.dtype
    xc = x if x.dtype == dtype else x.to(dtype)
    for cls in pack.classes:
        g = plan.grouped(cls.slots)
        if g is not None:
            _apply_class(y, xc, cls, g, scale)


def _apply_class(
    y: torch.Tensor, xc: torch.Tensor, cls: SlotClass, g: Grouped, scale: float
) -> None:
    sel = slice(g.first, g.first + g.count)  # member positions with rows in this step
    xg = xc.index_select(0, g.gather).view(g.count, g.per, -1)
    # Shrink in the layer's dtype, expand in fp32: measured here at 1-2 rows per slot,
    # oneDNN's bf16 batched GEMM reads [rank, out] weights at ~3.5 GB/s against ~10-15
    # GB/s in fp32 (so fp32 is faster despite twice the bytes), while for the [in, rank]
    # shrink both run at ~6 GB/s and bf16 reads half as much.
    h = torch.bmm(xg, cls.a[sel]).float()
    if scale != 1.0:
        h.mul_(scale)
    if cls.block is not None:
        d = torch.bmm(h, cls.block[sel])
        rows = d.view(g.count * g.per, -1).index_select(0, g.valid)
        _scatter_add(y, cls.span[0], cls.span[1], g.dest, rows)
        return
    pieces = [
        torch.bmm(h[:, :, c0:c1], b[sel]) for (c0, c1), b in zip(cls.cols, cls.b, strict=True)
    ]
    if len(pieces) == 1 or sum(o1 - o0 for o0, o1 in cls.outs) == cls.span[1] - cls.span[0]:
        d = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
        rows = d.view(g.count * g.per, -1).index_select(0, g.valid)
        _scatter_add(y, cls.span[0], cls.span[1], g.dest, rows)
        return
    for piece, (o0, o1) in zip(pieces, cls.outs, strict=True):  # a slice nobody uses between
        rows = piece.reshape(g.count * g.per, -1).index_select(0, g.valid)
        _scatter_add(y, o0, o1, g.dest, rows)


def _scatter_add(y: torch.Tensor, lo: int, hi: int, dest: torch.Tensor, rows: torch.Tensor) -> None:
    """``y[dest, lo:hi] += rows`` (dest rows distinct).

    ``index_add_`` into a column slice of y takes a slow element-wise path (measured: ~1.7
    ms for 16 rows of a bf16 qkv output, more than the whole LoRA GEMM work), so a partial
    width goes through a contiguous copy of the rows instead.
    """
    rows = rows if rows.dtype == y.dtype else rows.to(y.dtype)
    if lo == 0 and hi == y.shape[1] and y.is_contiguous():
        y.index_add_(0, dest, rows)
        return
    picked = y.index_select(0, dest)
    picked[:, lo:hi].add_(rows)
    y.index_copy_(0, dest, picked)


# --------------------------------------------------------------------------- wrapper

# The methods and op bindings `set_impl` switches between, filled by `install`.
_STATE: dict[str, Any] = {}


def _plan_of(wrapper: Any) -> StepPlan:
    plan: StepPlan | None = getattr(wrapper, "_loraswap_plan", None)
    if plan is None:
        plan = plan_step(wrapper.token_lora_indices.tolist())
        wrapper._loraswap_plan = plan
    return plan


def _pack_of(
    wrapper: Any,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    output_slices: Sequence[int],
) -> LayerPack:
    packs: dict[int, LayerPack] | None = getattr(wrapper, "_loraswap_packs", None)
    if packs is None:
        packs = wrapper._loraswap_packs = {}
    key = id(lora_a[0])
    pack = packs.get(key)
    if pack is None or pack.versions != _versions([*lora_a, *lora_b]):
        pack = packs[key] = build_pack(lora_a, lora_b, output_slices)
    return pack


def add_lora_linear(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: tuple[torch.Tensor, ...] | None = None,
    **kwargs: Any,
) -> None:
    """Drop-in for ``PunicaWrapperCPU.add_lora_linear`` (vLLM 0.32.0), same semantics."""
    if self.no_lora:
        return
    plan = _plan_of(self)
    y2 = y.view(-1, y.shape[-1])
    x2 = x.view(-1, x.shape[-1])
    if x2.shape[0] != plan.rows or y2.shape[0] != plan.rows:
        # Not the layout the plan describes (never seen with vLLM 0.32.0): stay correct.
        _STATE["orig_add_lora_linear"](
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
            buffer=buffer, **kwargs,
        )  # fmt: skip
        return
    pack = _pack_of(self, lora_a_stacked, lora_b_stacked, output_slices)
    apply_lora(y2, x2, pack, plan, scale)


def add_lora_logits(
    self: Any,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    scale: float,
    **kwargs: Any,
) -> Any:
    """``PunicaWrapperCPU.add_lora_logits``, skipped while no slot has lm_head weights.

    vLLM runs the logits LoRA for every step with an adapter request, although adapters
    that target lm_head are rare (our registry refuses them): a shrink and an expand
    over the whole vocabulary (49k x rank weights, ~6 MB read per step for the demo
    model at rank 64) that add zeros. Whether the slots hold any weights is cached
    against the tensors' version counters, like the layer packs.
    """
    key = (id(lora_b_stacked), lora_a_stacked._version, lora_b_stacked._version)
    known: dict[int, tuple[tuple[int, int, int], bool]] | None = getattr(
        self, "_loraswap_logits", None
    )
    if known is None:
        known = self._loraswap_logits = {}
    cached = known.get(id(lora_b_stacked))
    if cached is None or cached[0] != key:
        cached = (key, bool(lora_b_stacked.any()) and bool(lora_a_stacked.any()))
        known[id(lora_b_stacked)] = cached
    if not cached[1]:
        return None
    return _STATE["orig_add_lora_logits"](
        self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs
    )


def _make_update_metadata(original: Callable[..., Any]) -> Callable[..., Any]:
    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._loraswap_plan = None
        return original(self, *args, **kwargs)

    update_metadata.__wrapped__ = original  # type: ignore[attr-defined]
    return update_metadata


def install(wrapper_cls: Any, punica_module: ModuleType, upstream_ops: dict[str, Any]) -> None:
    """Bind the fast path on vLLM's PunicaWrapperCPU (idempotent).

    upstream_ops: vLLM's own op functions by name, kept so `set_impl("upstream")` can put
    them back (benchmarks only).
    """
    if _STATE:
        return
    _STATE.update(
        cls=wrapper_cls,
        module=punica_module,
        orig_add_lora_linear=vars(wrapper_cls)["add_lora_linear"],
        orig_add_lora_logits=vars(wrapper_cls).get("add_lora_logits"),
        orig_update_metadata=wrapper_cls.update_metadata,  # PunicaWrapperBase's
        upstream_ops=dict(upstream_ops),
    )
    wrapper_cls.update_metadata = _make_update_metadata(_STATE["orig_update_metadata"])
    set_impl("fast")


def set_impl(impl: Impl | str) -> None:
    """Switch the CPU LoRA path at run time: "fast", "ops" (per-op fix), "upstream"."""
    if not _STATE:
        raise RuntimeError("lora_fast is not installed in this process")
    cls, module = _STATE["cls"], _STATE["module"]
    if impl == "fast":
        cls.add_lora_linear = add_lora_linear
        if _STATE["orig_add_lora_logits"] is not None:
            cls.add_lora_logits = add_lora_logits
    elif impl in ("ops", "upstream"):
        cls.add_lora_linear = _STATE["orig_add_lora_linear"]
        if _STATE["orig_add_lora_logits"] is not None:
            cls.add_lora_logits = _STATE["orig_add_lora_logits"]
    else:
        raise ValueError(f"unknown LoRA implementation {impl!r}")
    ops = _STATE["upstream_ops"] if impl == "upstream" else lora_ops.OPS
    for name, fn in ops.items():
        setattr(module, name, fn)
