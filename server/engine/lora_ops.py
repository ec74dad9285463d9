"""Correct and faster replacements for vLLM's CPU (pure torch) punica LoRA ops.

The bug
-------
vLLM's CPU LoRA path (`vllm/lora/punica_wrapper/punica_cpu.py`) calls the six ops of
`vllm/lora/ops/torch_ops/lora_ops.py`. Each of them gathers the per-token adapter
weights with ``weights[lora_indices]``. A token that has no adapter (a base-model
request, or padding) carries index -1, which the Triton/CUDA kernels skip but which in
torch is ordinary negative indexing: such a token gets the LAST adapter slot applied.
So a base-model request batched next to LoRA requests silently answers with whatever
adapter happens to sit in slot ``max_loras - 1``. The same gather also materialises a
``[tokens, out, in]`` weight copy per call, which makes prefill slow.

The fix
-------
The ops below keep vLLM 0.32.0's signatures and in-place semantics exactly (argument
names and order, assignment for shrink, ``add_inputs`` for expand, ``scaling``, slice
offsets, the sgmv segment arguments, computing in the output dtype) but:

* a negative index means "no LoRA": the row behaves as if its adapter weights were zero
  (an accumulating op leaves it untouched, an assigning op writes zeros);
* the token -> slot layout is worked out once per call on the host (the index tensors are
  tiny, and CPU tensors make that "sync" free) as runs of rows sharing a slot, and no
  per-token weight copy is ever made. Then, whichever is cheapest for the batch:
  - "runs" (one adapter, adapter + base, prefill chunks): one ``addmm_`` per run,
    straight on views of the input and output: no gather, no temporary, no scatter;
  - "dense" (small fragmented batches: decode with interleaved adapters): one matmul of
    all rows against the used slots' stacked weights (a free view), then each row's
    own slot is picked out; a few more flops, far fewer calls;
  - "grouped" (large fragmented batches): per active slot one ``index_select``, one
    matmul, one ``index_add_``/``index_copy_``.

`install` swaps these ops in wherever vLLM bound the upstream ones by name (punica_cpu
does ``from vllm.lora.ops.torch_ops import bgmv_shrink, ...``, so patching the defining
module alone would not reach it). It also wraps ``_get_lora_device``: vLLM's CPU int8
W8A8 kernels (compressed-tensors, oneDNN path) prepack the weight and then set
``layer.weight = None``, after which ``_get_lora_device`` dies with ``'NoneType' object
has no attribute 'device'`` as soon as LoRA is enabled.

Why it lives here
-----------------
This module is pure torch and never imports vLLM (project rule: only
``server/engine/vllm.py`` does). The vLLM plugin hook there imports the vLLM modules and
hands them to `install`, after `upstream_bug_present` confirmed that the upstream ops
still have the bug: once upstream fixes it, the op replacement switches itself off.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Final

import torch

__all__ = [
    "OPS",
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink",
    "install",
    "is_ours",
    "lora_device",
    "make_lora_device_fix",
    "sgmv_expand",
    "sgmv_expand_slice",
    "sgmv_shrink",
    "upstream_bug_present",
]

# A run is (slot, start, stop): rows [start, stop) of the batch all use adapter `slot`
# (negative = no adapter). Runs are in row order and cover the batch exactly.
_Run = tuple[int, int, int]

# Strategy thresholds of _lora_mm. The matmuls are tiny (rank 8-64), so what they cost
# is mostly per-call overhead (~10-30 us per small bf16 matmul on 2 cores) plus, for the
# dense strategy, the flops spent on slots a row does not use. Measured with
# loadtests/bench_lora_ops.py-style layer calls (qkv slices, bf16, 1 thread: the 2-core
# box was shared, which made 2-thread timings noise) at hidden 576 / rank 16 and
# hidden 2048 / rank 64, 4-16 slots, 8-1024 rows:
# - runs of >= 32 rows (prefill chunks) are best done one matmul per run in place, as
#   long as there are at most 4 runs per active slot;
# - otherwise all-slots-at-once ("dense") wins while rows * slots * out * in stays under
#   ~8M multiply-adds (e.g. 128 decode rows over 4 slots at hidden 576 / rank 16), and
#   per-slot gather + matmul + scatter ("grouped") wins above that.
_LONG_RUN_ROWS: Final = 32
_MAX_RUNS_PER_SLOT: Final = 4
_DENSE_MAX_MACS: Final = 1 << 23


# --------------------------------------------------------------------------- helpers


def _runs_from_indices(indices: torch.Tensor) -> list[_Run]:
    """Runs of equal consecutive per-token slot indices."""
    # One host copy of a (tiny) index tensor instead of a device-side unique/sort: on
    # CPU it is a memcpy, and the Python walk is cheaper than two extra torch calls for
    # the batch sizes the bgmv ops see (one row per sequence).
    slots: list[int] = indices.tolist()
    runs: list[_Run] = []
    start = 0
    for pos in range(1, len(slots) + 1):
        if pos == len(slots) or slots[pos] != slots[start]:
            runs.append((slots[start], start, pos))
            start = pos
    return runs


def _runs_from_segments(
    seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor, num_rows: int
) -> list[_Run]:
    """Runs of the sgmv layout: segment i has seq_len[i] rows using lora_indices[i].

    Upstream expands this with ``repeat_interleave(lora_indices, seq_len)``, i.e. the
    segments are taken back to back from row 0 and ``b_seq_start_loc`` is not consulted;
    we follow the same rule so both agree on every input.
    """
    lens: list[int] = seq_len_tensor.tolist()
    slots: list[int] = lora_indices_tensor.tolist()
    if len(lens) != len(slots):
        raise ValueError(f"sgmv: {len(slots)} segment indices for {len(lens)} segment lengths")
    runs: list[_Run] = []
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


def _stacked_3d(weights: torch.Tensor) -> torch.Tensor:
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
    runs: Sequence[_Run],
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
    runs: Sequence[_Run],
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
    runs: Sequence[_Run],
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
    runs: Sequence[_Run],
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


def _dispatch(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    runs: Sequence[_Run],
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


def _check_indices(inputs: torch.Tensor, lora_indices_tensor: torch.Tensor) -> None:
    if lora_indices_tensor.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"bgmv: {lora_indices_tensor.shape[0]} indices for {inputs.shape[0]} input rows"
        )


# --------------------------------------------------------------------------- the ops
# Names, parameter names/order and defaults are vLLM 0.32.0's (even bgmv_shrink's
# `lora_b_weights`), so callers passing keywords keep working and `install` can check
# the signatures it replaces.


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """``output_tensor[t, :rank] = scaling * inputs[t] @ W[idx[t]].T`` (zeros for idx -1)."""
    _check_indices(inputs, lora_indices_tensor)
    weights = _stacked_3d(lora_b_weights)
    out = output_tensor[:, : weights.shape[1]]
    runs = _runs_from_indices(lora_indices_tensor)
    _dispatch(inputs, weights, out, runs, scaling, accumulate=False, truncate=False)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """``output_tensor[t, :n] (+)= inputs[t] @ W[idx[t]].T`` over the common width n."""
    _check_indices(inputs, lora_indices_tensor)
    weights = _stacked_3d(lora_b_weights)
    # Adapter and model may pad the output dimension differently: only the common
    # columns are computed and written (upstream computes all and drops the rest).
    common = min(weights.shape[1], output_tensor.shape[1])
    runs = _runs_from_indices(lora_indices_tensor)
    _dispatch(
        inputs,
        weights[:, :common],
        output_tensor[:, :common],
        runs,
        1.0,
        accumulate=add_inputs,
        truncate=True,
    )


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """``output_tensor[t, off:off+size] (+)= inputs[t] @ W[idx[t]].T``."""
    _check_indices(inputs, lora_indices_tensor)
    weights = _stacked_3d(lora_b_weights)
    out = output_tensor[:, slice_offset : slice_offset + slice_size]
    if out.shape[1] != weights.shape[1]:
        raise ValueError(
            f"expand_slice: slice of width {out.shape[1]} for LoRA output {weights.shape[1]}"
        )
    runs = _runs_from_indices(lora_indices_tensor)
    _dispatch(inputs, weights, out, runs, 1.0, accumulate=add_inputs, truncate=False)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    """Segment form of `bgmv_shrink`: segment i is seq_len[i] rows using lora_indices[i].

    b_seq_start_loc, batches, max_seq_length and token_nums are accepted for signature
    compatibility and, as upstream, not used (the segments are back to back from row 0).
    """
    weights = _stacked_3d(lora_a_weights)
    out = output_tensor[:, : weights.shape[1]]
    runs = _runs_from_segments(seq_len_tensor, lora_indices_tensor, inputs.shape[0])
    _dispatch(inputs, weights, out, runs, scaling, accumulate=False, truncate=False)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    """Segment form of `bgmv_expand` (same unused arguments as `sgmv_shrink`)."""
    weights = _stacked_3d(lora_b_weights)
    common = min(weights.shape[1], output_tensor.shape[1])
    runs = _runs_from_segments(seq_len_tensor, lora_indices_tensor, inputs.shape[0])
    _dispatch(
        inputs,
        weights[:, :common],
        output_tensor[:, :common],
        runs,
        1.0,
        accumulate=add_inputs,
        truncate=True,
    )


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    """Segment form of `bgmv_expand_slice` (same unused arguments as `sgmv_shrink`)."""
    weights = _stacked_3d(lora_b_weights)
    out = output_tensor[:, slice_offset : slice_offset + slice_size]
    if out.shape[1] != weights.shape[1]:
        raise ValueError(
            f"expand_slice: slice of width {out.shape[1]} for LoRA output {weights.shape[1]}"
        )
    runs = _runs_from_segments(seq_len_tensor, lora_indices_tensor, inputs.shape[0])
    _dispatch(inputs, weights, out, runs, 1.0, accumulate=add_inputs, truncate=False)


OPS: Final[dict[str, Callable[..., None]]] = {
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "bgmv_shrink": bgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
}


def is_ours(fn: object) -> bool:
    """True if `fn` is one of the replacement ops of this module."""
    return any(fn is op for op in OPS.values())


# --------------------------------------------------------------------------- probe


def upstream_bug_present(bgmv_shrink: Callable[..., object]) -> bool:
    """Whether the given shrink op gives a token with index -1 a LoRA contribution.

    Two tokens over two adapter slots; token 0 uses slot 0, token 1 has no adapter
    (-1). A correct op leaves row 1 of the output at zero; the buggy upstream op applies
    the last slot (all ones here) and writes a nonzero row. Exceptions from the op
    propagate: an op that cannot run this 0.32.0-style call is not one we should
    replace with 0.32.0-style ops either.
    """
    hidden, rank = 4, 2
    inputs = torch.ones(2, hidden, dtype=torch.float32)
    weights = torch.ones(2, 1, rank, hidden, dtype=torch.float32)
    indices = torch.tensor([0, -1], dtype=torch.long)
    output = torch.zeros(2, rank, dtype=torch.float32)
    bgmv_shrink(inputs, weights, output, indices, 1.0)
    return bool(output[1].abs().sum().item() != 0.0)


# --------------------------------------------------------------------------- device fix

# Where vLLM's _get_lora_device looks, in its order; dotted = nested attribute.
_DEVICE_ATTRS: Final = (
    "weight",
    "weight_packed",
    "qweight",
    "ark_linear.qweight",
    "w2_weight",
    "w2_weight_packed",
    "w2_qweight",
)

_LoraDeviceFn = Callable[[torch.nn.Module], torch.device]


def lora_device(base_layer: torch.nn.Module) -> torch.device:
    """Device for a layer's LoRA tensors, tolerating attributes that are None.

    Same lookup order as vLLM's ``_get_lora_device`` but an attribute that exists and
    is None (the CPU W8A8 int8 kernels drop ``weight`` after prepacking it) is skipped
    instead of dereferenced; failing every known name, the first parameter, then the
    first buffer of the layer decides.
    """
    layer: torch.nn.Module = getattr(base_layer, "routed_experts", base_layer)
    for path in _DEVICE_ATTRS:
        value: object = layer
        for name in path.split("."):
            value = getattr(value, name, None)
        if isinstance(value, torch.Tensor):
            return value.device
    for module in (layer, base_layer):
        for param in module.parameters():
            return param.device
        for buf in module.buffers():
            return buf.device
    raise ValueError(f"Unsupported base layer: {base_layer}")


# original _get_lora_device -> its wrapper, so every module gets the same wrapper and
# a second install recognises (and skips) what it already wrapped.
_DEVICE_FIXES: dict[_LoraDeviceFn, _LoraDeviceFn] = {}


def make_lora_device_fix(original: _LoraDeviceFn) -> _LoraDeviceFn:
    """Wrap vLLM's ``_get_lora_device``: its answer when it has one, else `lora_device`.

    Wrapping rather than replacing keeps upstream's behaviour (and any layer types a
    later vLLM learns about) for every layer it handles; only the AttributeError of a
    None attribute falls through to the tolerant lookup. Idempotent per original.
    """
    if original in _DEVICE_FIXES.values():
        return original
    existing = _DEVICE_FIXES.get(original)
    if existing is not None:
        return existing

    @functools.wraps(original)
    def _get_lora_device(base_layer: torch.nn.Module) -> torch.device:
        try:
            return original(base_layer)
        except AttributeError:
            return lora_device(base_layer)

    _DEVICE_FIXES[original] = _get_lora_device
    return _get_lora_device


# --------------------------------------------------------------------------- install


def _same_parameters(a: Callable[..., object], b: Callable[..., object]) -> bool:
    try:
        return list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters)
    except (TypeError, ValueError):  # no introspectable signature: do not guess
        return False


def install(
    punica_cpu_module: ModuleType | None,
    device_fix_modules: Iterable[ModuleType] = (),
    *,
    extra_op_modules: Iterable[ModuleType] = (),
) -> list[str]:
    """Bind our ops and the tolerant ``_get_lora_device`` where vLLM bound the originals.

    punica_cpu_module: ``vllm.lora.punica_wrapper.punica_cpu``, whose methods call the
        ops through its module globals (it did ``from vllm.lora.ops.torch_ops import
        ...``). None: leave the ops alone and apply only the device fix (upstream ops
        already correct).
    device_fix_modules: modules with a module-level ``_get_lora_device`` to wrap: the
        defining ``vllm.lora.layers.utils`` and every importer of it by name
        (``vllm.lora.layers.base_linear``, ``vllm.lora.layers.fused_moe`` in 0.32.0).
    extra_op_modules: further namespaces holding the ops by name (e.g.
        ``vllm.lora.ops.torch_ops`` and its ``lora_ops``) so later importers get ours;
        ignored when punica_cpu_module is None.

    An op is only replaced if its parameter names are those of ours (vLLM 0.32.0's), so
    a changed upstream signature is skipped and reported, not mis-called. Returns one
    line per binding changed or skipped, e.g. ``"vllm.lora.punica_wrapper.punica_cpu.
    bgmv_shrink"``. Idempotent: a second call changes nothing; it returns [] unless
    some binding was skipped (skips are reported on every call).
    """
    done: list[str] = []
    if punica_cpu_module is not None:
        for module in (punica_cpu_module, *extra_op_modules):
            for name, ours in OPS.items():
                current: object = getattr(module, name, None)
                if current is None or current is ours:
                    continue
                where = f"{module.__name__}.{name}"
                if not callable(current) or not _same_parameters(current, ours):
                    done.append(f"{where} (skipped: signature differs from vLLM 0.32.0)")
                    continue
                setattr(module, name, ours)
                done.append(where)
    for module in device_fix_modules:
        current_fn: object = getattr(module, "_get_lora_device", None)
        if current_fn is None or not callable(current_fn):
            continue
        wrapper = make_lora_device_fix(current_fn)
        if wrapper is current_fn:
            continue
        module._get_lora_device = wrapper  # type: ignore[attr-defined]
        done.append(f"{module.__name__}._get_lora_device")
    return done
