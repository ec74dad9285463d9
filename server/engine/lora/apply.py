"""Apply one layer's LoRA to a step: few GEMMs per layer call, whatever the adapters.

One adapter over contiguous rows (single-stream decode, prefill chunks): one shrink
``mm`` and one expand ``addmm_``-like GEMM straight on views of x and y. Several
adapters interleaved (batched decode): the step's adapters are stacked class by class
(server/engine/lora/pack.py), rows gathered into a padded ``[adapters, rows, in]``
block, then one ``bmm`` shrink, one ``bmm`` expand and one scatter back. Base rows cost
nothing, and a step without adapters returns at once.

Numerics: shrink and expand in fp32 (upstream's shrink buffer is fp32 too; see
server/engine/lora/pack.py for why fp32 is also the faster one here), added in place into
the layer output in its dtype. Pure functions over
tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from server.engine.lora.pack import LayerPack, SlotAlone, SlotClass
from server.engine.lora.plan import Grouped, StepPlan

__all__ = ["apply_lora", "scatter_add"]


def apply_lora(
    y: torch.Tensor, x: torch.Tensor, pack: LayerPack, plan: StepPlan, scale: float
) -> None:
    """``y[t] += scale * x[t] @ A[slot(t)] @ B[slot(t)]`` for every adapter row t."""
    if plan.no_lora or not pack.any_weights:
        return
    if plan.runs:
        _apply_runs(y, x, pack, plan, scale)
    for slot, rows in plan.spread:
        alone = pack.alone(slot)
        if alone is not None:
            _apply_spread(y, x, alone, rows, scale)
    if not plan.scattered:
        return
    # Only the adapters of this step's gathered rows are stacked: with many slots (one
    # adapter per customer) most are idle in any one step, and reading them would cost.
    classes = pack.classes_for(plan.scattered_slots)
    if not classes:
        return
    xc = x if x.dtype == torch.float32 else x.float()
    for cls in classes:
        g = plan.grouped(cls.slots)
        if g is not None:
            _apply_class(y, xc, cls, g, scale)


def _apply_runs(
    y: torch.Tensor, x: torch.Tensor, pack: LayerPack, plan: StepPlan, scale: float
) -> None:
    xf = x if x.dtype == torch.float32 else x.float()
    for slot, start, stop in plan.runs:
        alone = pack.alone(slot)
        if alone is None:
            continue
        whole = start == 0 and stop == plan.rows
        rows = y if whole else y[start:stop]
        for o0, o1, d in _lora_delta(xf if whole else xf[start:stop], alone, scale):
            rows[:, o0:o1].add_(d)  # fp32 into the layer dtype


def _apply_spread(
    y: torch.Tensor, x: torch.Tensor, alone: SlotAlone, rows: torch.Tensor, scale: float
) -> None:
    """One adapter's rows apart from each other: gathered, one GEMM pair, scattered back."""
    xs = x.index_select(0, rows)
    for o0, o1, d in _lora_delta(xs if xs.dtype == torch.float32 else xs.float(), alone, scale):
        scatter_add(y, o0, o1, rows, d)


def _lora_delta(
    xf: torch.Tensor, alone: SlotAlone, scale: float
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``scale * xf @ A @ B`` for one adapter's rows (fp32), as (out0, out1, columns)."""
    h = torch.mm(xf, alone.a)
    if scale != 1.0:
        h.mul_(scale)
    for c0, c1, o0, o1, b in alone.expands:
        part = h if c0 == 0 and c1 == h.shape[1] else h[:, c0:c1]
        yield o0, o1, torch.mm(part, b)


def _apply_class(
    y: torch.Tensor, xc: torch.Tensor, cls: SlotClass, g: Grouped, scale: float
) -> None:
    sel = slice(g.first, g.first + g.count)  # member positions with rows in this step
    xg = xc.index_select(0, g.gather).view(g.count, g.per, -1)
    h = torch.bmm(xg, cls.a[sel])
    if scale != 1.0:
        h.mul_(scale)
    if cls.block is not None:
        d = torch.bmm(h, cls.block[sel])
        rows = d.view(g.count * g.per, -1).index_select(0, g.valid)
        scatter_add(y, cls.span[0], cls.span[1], g.dest, rows)
        return
    pieces = [
        torch.bmm(h[:, :, c0:c1], b[sel]) for (c0, c1), b in zip(cls.cols, cls.b, strict=True)
    ]
    if len(pieces) == 1 or sum(o1 - o0 for o0, o1 in cls.outs) == cls.span[1] - cls.span[0]:
        d = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
        rows = d.view(g.count * g.per, -1).index_select(0, g.valid)
        scatter_add(y, cls.span[0], cls.span[1], g.dest, rows)
        return
    for piece, (o0, o1) in zip(pieces, cls.outs, strict=True):  # a slice nobody uses between
        rows = piece.reshape(g.count * g.per, -1).index_select(0, g.valid)
        scatter_add(y, o0, o1, g.dest, rows)


def scatter_add(y: torch.Tensor, lo: int, hi: int, dest: torch.Tensor, rows: torch.Tensor) -> None:
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
