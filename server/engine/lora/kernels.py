"""The math of the per-op fix: ``out[t] (+)= scale * x[t] @ W[slot(t)].T`` for a batch
whose rows carry adapter slots, with a negative slot meaning "no adapter".

Pure functions over tensors; the vLLM-shaped ops of `server.engine.lora.ops` parse their
arguments into runs and call `dispatch`. The token -> slot layout is worked out on the
host as runs of rows sharing a slot (the index tensors are tiny, and CPU tensors make
that "sync" free), and no per-token weight copy is ever made. Then, whichever is
cheapest for the batch:

- "runs" (one adapter, adapter + base, prefill chunks): one ``addmm_`` per run,
  straight on views of the input and output: no gather, no temporary, no scatter;
- "dense" (small fragmented batches: decode with interleaved adapters): one matmul of
  all rows against the used slots' stacked weights (a free view), then each row's own
  slot is picked out; a few more flops, far fewer calls;
- "grouped" (large fragmented batches): per active slot one ``index_select``, one
  matmul, one ``index_add_``/``index_copy_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import torch

__all__ = [
    "Run",
    "dispatch",
    "runs_from_indices",
    "runs_from_segments",
    "stacked_3d",
]

# A run is (slot, start, stop): rows [start, stop) of the batch all use adapter `slot`
# (negative = no adapter). Runs are in row order; those of the ops cover the batch exactly.
Run = tuple[int, int, int]

# Strategy thresholds of _lora_mm. The matmuls are tiny (rank 8-64), so what they cost
# is mostly per-call overhead (~10-30 us per small bf16 matmul on 2 cores) plus, for the
# dense strategy, the flops spent on slots a row does not use. Measured with
# loadtests/micro/bench_lora_ops.py-style layer calls (qkv slices, bf16, 1 thread) at hidden
# 576 / rank 16 and hidden 2048 / rank 64, 4-16 slots, 8-1024 rows; re-measure with that
# script before changing them:
# - runs of >= 32 rows (prefill chunks) are best done one matmul per run in place, as
#   long as there are at most 4 runs per active slot;
# - otherwise all-slots-at-once ("dense") wins while rows * slots * out * in stays under
#   ~8M multiply-adds (e.g. 128 decode rows over 4 slots at hidden 576 / rank 16), and
#   per-slot gather + matmul + scatter ("grouped") wins above that.
_LONG_RUN_ROWS: Final = 32
_MAX_RUNS_PER_SLOT: Final = 4
_DENSE_MAX_MACS: Final = 1 << 23


def runs_from_indices(indices: torch.Tensor) -> list[Run]:
    """Runs of equal consecutive per-token slot indices."""
    # One host copy of a (tiny) index tensor instead of a device-side unique/sort: on
    # CPU it is a memcpy, and the Python walk is cheaper than two extra torch calls for
    # the batch sizes the bgmv ops see (one row per sequence).
    slots: list[int] = indices.tolist()
    runs: list[Run] = []
    start = 0
    for pos in range(1, len(slots) + 1):
        if pos == len(slots) or slots[pos] != slots[start]:
            runs.append((slots[start], start, pos))
            start = pos
    return runs


def runs_from_segments(
    seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor, num_rows: int
) -> list[Run]:
    """Runs of the sgmv layout: segment i has seq_len[i] rows using lora_indices[i].

    Upstream expands this with ``repeat_interleave(lora_indices, seq_len)``, i.e. the
    segments are taken back to back from row 0 and ``b_seq_start_loc`` is not consulted;
    we follow the same rule so both agree on every input.
    """
    lens: list[int] = seq_len_tensor.tolist()
    slots: list[int] = lora_indices_tensor.tolist()
    if len(lens) != len(slots):
        raise ValueError(f"sgmv: {len(slots)} segment indices for {len(lens)} segment lengths")
    runs: list[Run] = []
    start = 0
    for slot, length in zip(slots, lens, strict=True):
        if length <= 0:
            continue
        stop = start + length
        if runs and runs[-1][0] == slot:  # merge: fewer, larger matmuls
            runs[-1] = (slot, runs[-1][1], stop)
        else:
            runs.append((slot, start, stop))
        start = stop
    if start != num_rows:
        raise ValueError(f"sgmv: segment lengths sum to {start}, inputs have {num_rows} rows")
    return runs


def stacked_3d(weights: torch.Tensor) -> torch.Tensor:
    """[slots, 1, out, in] -> [slots, out, in] (a view), as upstream's squeeze(dim=1)."""
    if weights.dim() == 4:
        if weights.shape[1] != 1:
            raise ValueError(f"LoRA weights of shape {tuple(weights.shape)}: dim 1 must be 1")
        return weights.squeeze(1)
    if weights.dim() != 3:
        raise ValueError(f"LoRA weights must be 3-D or 4-D, got {tuple(weights.shape)}")
    return weights


def _check_slot(slot: int, num_slots: int) -> None:
    # Upstream's weights[idx] raises IndexError for an index past the last slot; keep
    # that, rather than letting a bad mapping read a wrong slot.
    if slot >= num_slots:
        raise IndexError(f"LoRA slot {slot} out of range for {num_slots} slots")


def _lora_mm(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    runs: Sequence[Run],
    scale: float,
    accumulate: bool,
) -> None:
    """``out[t] (+)= scale * inputs[t] @ weights[slot(t)].T`` for every row t, in place.

    inputs: [T, in]; weights: [slots, out_cols, in]; out: [T, out_cols] (any strided
    view: a column slice of a bigger tensor is written in place). Rows whose slot is
    negative get nothing when accumulating and zeros when assigning. As upstream, the
    product is computed in ``out.dtype`` (inputs and weights are cast to it).
    """
    active = [run for run in runs if run[0] >= 0]
    if not active:
        if not accumulate:
            out.zero_()
        return
    used = {run[0] for run in active}
    for slot in used:
        _check_slot(slot, weights.shape[0])
    num_rows = sum(stop - start for _, start, stop in active)
    # dense computes the contiguous slot range the batch uses, not every slot
    dense_macs = inputs.shape[0] * (max(used) - min(used) + 1) * weights.shape[1] * weights.shape[2]

    if len(active) <= 2 or (
        num_rows >= _LONG_RUN_ROWS * len(active) and len(active) <= _MAX_RUNS_PER_SLOT * len(used)
    ):
        # One or two blocks (one adapter, adapter + base) or long prefill chunks: one
        # matmul per run, reading and writing the rows in place.
        _mm_runs(inputs, weights, out, runs, scale, accumulate)
    elif dense_macs <= _DENSE_MAX_MACS:
        # Small fragmented batch (decode): one matmul against the used slots, then pick.
        _mm_dense(inputs, weights, out, runs, scale, accumulate)
    else:
        # Large fragmented batch: one gathered matmul per active slot.
        _mm_grouped(inputs, weights, out, runs, scale, accumulate)


def _mm_runs(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    runs: Sequence[Run],
    scale: float,
    accumulate: bool,
) -> None:
    """One ``addmm_`` per run of rows sharing a slot, straight on input/output views."""
    dtype = out.dtype
    w_t: dict[int, torch.Tensor] = {}  # each slot's weights cast once per call
    # beta=0 makes addmm_ ignore (so overwrite, NaNs included) what `out` held.
    beta = 1.0 if accumulate else 0.0
    for slot, start, stop in runs:
        if slot < 0:
            if not accumulate:
                out[start:stop].zero_()
            continue
        wt = w_t.get(slot)
        if wt is None:
            wt = w_t[slot] = weights[slot].to(dtype).t()
        out[start:stop].addmm_(inputs[start:stop].to(dtype), wt, beta=beta, alpha=scale)


def _mm_dense(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    runs: Sequence[Run],
    scale: float,
    accumulate: bool,
) -> None:
    """Every used slot for every row in one matmul (``[T, in] @ [in, slots*out]``), then
    each row's own slot is picked out.

    The stacked weights ``[slots, out, in]`` are already a contiguous ``[slots*out, in]``
    matrix, so this needs no weight copy; it spends ``slots`` times the (tiny) flops to
    replace per-slot calls by a single one, which pays only while the batch is small.
    """
    dtype = out.dtype
    num_rows = inputs.shape[0]
    lowest = min(run[0] for run in runs if run[0] >= 0)
    highest = max(run[0] for run in runs)
    # [used slots, out, in] is a contiguous [used*out, in] matrix: no weight copy.
    used = weights[lowest : highest + 1]
    num_used, width, depth = used.shape
    products = torch.mm(inputs.to(dtype), used.reshape(num_used * width, depth).to(dtype).t())
    pick: list[int] = []
    no_lora: list[int] = []
    for slot, start, stop in runs:
        for row in range(start, stop):
            # a base row picks any product; it is zeroed below
            pick.append(row * num_used + max(slot - lowest, 0))
            if slot < 0:
                no_lora.append(row)
    picked = products.view(num_rows * num_used, width).index_select(
        0, torch.tensor(pick, dtype=torch.long, device=out.device)
    )
    if no_lora:
        picked.index_fill_(0, torch.tensor(no_lora, dtype=torch.long, device=out.device), 0)
    if scale != 1.0:
        picked.mul_(scale)
    if accumulate:
        out.add_(picked)
    else:
        out.copy_(picked)


def _mm_grouped(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    runs: Sequence[Run],
    scale: float,
    accumulate: bool,
) -> None:
    """Per active slot: gather its rows, one matmul, scatter (add or copy) back."""
    dtype = out.dtype
    rows_of: dict[int, list[int]] = {}
    for slot, start, stop in runs:
        rows_of.setdefault(slot, []).extend(range(start, stop))
    for slot, rows in rows_of.items():
        index = torch.tensor(rows, dtype=torch.long, device=out.device)
        if slot < 0:
            if not accumulate:
                out.index_fill_(0, index, 0)
            continue
        product = torch.mm(inputs.index_select(0, index).to(dtype), weights[slot].to(dtype).t())
        if scale != 1.0:
            product.mul_(scale)
        if accumulate:
            out.index_add_(0, index, product)
        else:
            out.index_copy_(0, index, product)


def _lora_mm_broadcast(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    slot: int,
    scale: float,
    accumulate: bool,
) -> None:
    """One input row applied to every output row (upstream's broadcasting corner case)."""
    if slot < 0:
        if not accumulate:
            out.zero_()
        return
    _check_slot(slot, weights.shape[0])
    product = torch.mm(inputs.to(out.dtype), weights[slot].to(out.dtype).t())
    if scale != 1.0:
        product.mul_(scale)
    if accumulate:
        out.add_(product)
    else:
        out.copy_(product.expand_as(out))


def dispatch(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    runs: Sequence[Run],
    scale: float,
    accumulate: bool,
    truncate: bool,
) -> None:
    """Shape rules shared by all ops, mirroring what upstream's einsum + assignment do.

    - inputs and runs have the same number of rows T (einsum needs it);
    - T == out rows is the normal case; T == 1 broadcasts that row to all output rows;
    - only the expand ops (``truncate``) accept T > out rows and use the first rows
      (upstream's ``outputs[:limit]``); any other mismatch is an error, as upstream.
    """
    num_rows = inputs.shape[0]
    out_rows = out.shape[0]
    if num_rows == 1 and out_rows != 1:
        _lora_mm_broadcast(inputs, weights, out, runs[0][0], scale, accumulate)
        return
    if num_rows != out_rows:
        if not (truncate and num_rows > out_rows):
            raise ValueError(f"LoRA op: {num_rows} input rows for {out_rows} output rows")
        inputs = inputs[:out_rows]
        runs = [(s, a, min(b, out_rows)) for s, a, b in runs if a < out_rows]
    _lora_mm(inputs, weights, out, runs, scale, accumulate)
